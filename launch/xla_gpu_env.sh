# Sourced by the GPU launchers: XLA and JAX settings for training on NVIDIA GPUs.
# Each keeps a value you exported yourself.
#   --xla_gpu_enable_latency_hiding_scheduler: overlap FSDP all-gathers / reduce-scatters and
#     data-parallel all-reduces with compute (the main multi-GPU throughput knob).
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}
# Let XLA take most of the GPU memory up front (no allocator growth mid-run).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# TensorFlow (the input pipeline) stays on the CPU; keep its logs quiet.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
