// Helpers shared by mtjax's CPU kernels (x86-64, AVX-512 or AVX2; see mtjax/kernels/__init__.py).

#ifndef MTJAX_KERNELS_CPU_COMMON_H_
#define MTJAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace mtjax_kernels {

// Runs fn(0) .. fn(n - 1) over XLA's intra-op thread pool; the calling thread works too, and
// waits only for tasks, never for helpers that have not started (so a busy pool cannot
// deadlock it).
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int n, const Fn& fn) {
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn] {
    for (int i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), n)) - 1;
  for (int t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace mtjax_kernels

#endif  // MTJAX_KERNELS_CPU_COMMON_H_
