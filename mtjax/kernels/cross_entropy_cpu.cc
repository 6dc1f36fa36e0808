// Token cross-entropy with T5X's z-loss over float32 logits, fused for x86-64 CPUs with
// AVX-512 or AVX2, as XLA FFI custom calls.
//
// Per row of logits l [V] and target t: lse = max + log(sum(exp(l - max))), loss = lse - l[t]
// + z_loss * lse^2 (l[t] read as 0 when t is outside [0, V), like mtjax's masked sum), and
// whether the first index of the maximum is t (mtjax.model.softmax.first_argmax).
//
// Why: XLA:CPU makes several passes over the [tokens, V] logits (max, exp, sum, the target's
// logit, the argmax, then the gradient), each writing a fresh [tokens, V] buffer that the step
// faults in anew. Here the forward pass reads each row once from memory and overwrites the
// logits in place with exp(l - max) (the buffers are aliased); the backward pass turns those
// into the gradient, again in place.
//
// Built and loaded at run time by mtjax/kernels/__init__.py, with attention_cpu.cc.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
// Inside mtjax_kernels: ParallelFor (cpu_common.h), the 16-float vectors and their
// operations (simd.h).
namespace mtjax_kernels {
namespace {

constexpr int kRowsPerTask = 8;

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                   ffi::Buffer<ffi::S32> targets, float z_loss,
                   ffi::ResultBuffer<ffi::F32> exps, ffi::ResultBuffer<ffi::F32> loss,
                   ffi::ResultBuffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> correct,
                   ffi::ResultBuffer<ffi::F32> stats) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2 || targets.element_count() != static_cast<size_t>(dims[0]))
    return ffi::Error::InvalidArgument("mtjax cross-entropy: logits [N, V], targets [N]");
  const int64_t N = dims[0], V = dims[1];
  const float* lp = logits.typed_data();
  const int32_t* tp = targets.typed_data();
  float* ep = exps->typed_data();  // the same memory as lp (aliased)
  float* loss_p = loss->typed_data();
  float* z_p = z->typed_data();
  float* correct_p = correct->typed_data();
  float* stats_p = stats->typed_data();  // per row: lse, 1 / sum

  const int tasks = static_cast<int>((N + kRowsPerTask - 1) / kRowsPerTask);
  ParallelFor(pool, tasks, [&](int task) {
    const int64_t end = std::min<int64_t>(N, (task + 1) * int64_t{kRowsPerTask});
    for (int64_t n = task * int64_t{kRowsPerTask}; n < end; ++n) {
      const float* row = lp + n * V;
      // Pass 1: the maximum, the first index reaching it (per lane, then across lanes), NaNs.
      Vec best = Set(-INFINITY);
      Index best_index = SetIndex(static_cast<int32_t>(V));
      Index index = Iota();
      Mask nan = EmptyMask();
      ForEachVector(V, [&](int64_t s, auto lanes) {
        const Vec x = LoadOr(Set(-INFINITY), row + s, lanes);
        nan = Or(nan, IsNan(x));
        const Mask greater = Greater(x, best);
        best = Select(greater, x, best);
        best_index = Select(greater, index, best_index);
        index = index + 16;
      });
      const float mx = ReduceMax(best);
      int argmax = MinWhere(Equal(best, Set(mx)), best_index);
      const int32_t t = tp[n];
      const float target_logit = (t >= 0 && t < V) ? row[t] : 0.0f;  // before the overwrite
      // Pass 2 (the row is in cache now): exp(l - max) in place, and its sum.
      Vec sum = Zero();
      const Vec shift = Set(mx);
      float* erow = ep + n * V;
      ForEachVector(V, [&](int64_t s, auto lanes) {
        const Vec e = ExpNonPositive(Load(row + s, lanes) - shift);
        Store(erow + s, e, lanes);
        sum = sum + Select(lanes, e, Zero());
      });
      float total = ReduceAdd(sum);
      if (Any(nan)) {  // a NaN anywhere: NaN loss (the step's non-finite check sees it), no argmax
        total = NAN;
        argmax = static_cast<int>(V);
      }
      const float lse = mx + std::log(total);
      const float z_term = z_loss * (lse * lse);
      loss_p[n] = (lse - target_logit) + z_term;
      z_p[n] = z_term;
      correct_p[n] = argmax == t ? 1.0f : 0.0f;
      stats_p[2 * n] = lse;
      stats_p[2 * n + 1] = 1.0f / total;
    }
  });
  return ffi::Error::Success();
}

// d/dl of (g_loss * loss + g_z * z) = p * (g_loss * (1 + 2 z_loss lse) + g_z * 2 z_loss lse)
// - g_loss * [v == t], with p = exp(l - max) / sum, written over exps in place.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> exps,
                    ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> stats,
                    ffi::Buffer<ffi::F32> d_loss, ffi::Buffer<ffi::F32> d_z, float z_loss,
                    ffi::ResultBuffer<ffi::F32> d_logits) {
  const auto dims = exps.dimensions();
  const int64_t N = dims[0], V = dims[1];
  const float* ep = exps.typed_data();
  const int32_t* tp = targets.typed_data();
  const float* sp = stats.typed_data();
  const float* glp = d_loss.typed_data();
  const float* gzp = d_z.typed_data();
  float* dp = d_logits->typed_data();  // the same memory as ep (aliased)

  const int tasks = static_cast<int>((N + kRowsPerTask - 1) / kRowsPerTask);
  ParallelFor(pool, tasks, [&](int task) {
    const int64_t end = std::min<int64_t>(N, (task + 1) * int64_t{kRowsPerTask});
    for (int64_t n = task * int64_t{kRowsPerTask}; n < end; ++n) {
      const float lse = sp[2 * n], inv_sum = sp[2 * n + 1];
      const float two_z_lse = 2.0f * z_loss * lse;
      const float scale = inv_sum * (glp[n] * (1.0f + two_z_lse) + gzp[n] * two_z_lse);
      const Vec c = Set(scale);
      const float* erow = ep + n * V;
      float* drow = dp + n * V;
      ForEachVector(V, [&](int64_t s, auto lanes) {
        Store(drow + s, Load(erow + s, lanes) * c, lanes);
      });
      const int32_t t = tp[n];
      if (t >= 0 && t < V) drow[t] -= glp[n];
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace mtjax_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtjaxCrossEntropyForward, mtjax_kernels::Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits [N, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // targets [N]
                                  .Attr<float>("z_loss")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // exp(l - max), over logits
                                  .Ret<ffi::Buffer<ffi::F32>>()   // loss [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // z-loss part [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // first argmax == target
                                  .Ret<ffi::Buffer<ffi::F32>>()); // lse, 1 / sum [N, 2]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtjaxCrossEntropyBackward, mtjax_kernels::Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // exp(l - max) [N, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // targets [N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse, 1 / sum [N, 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d loss [N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d z-loss part [N]
                                  .Attr<float>("z_loss")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // d logits, over exps
