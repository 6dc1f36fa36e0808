// Helpers shared by mtjax's CPU kernels (x86-64, AVX-512; see mtjax/kernels/__init__.py).

#ifndef MTJAX_KERNELS_CPU_COMMON_H_
#define MTJAX_KERNELS_CPU_COMMON_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace mtjax_kernels {

// Lanes [s, min(s + 16, n)) of a row of n floats.
inline __mmask16 TailMask(int64_t n, int64_t s) {
  const int64_t left = n - s;
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : static_cast<__mmask16>((1u << left) - 1);
}

// exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, degree-5 polynomial, about 1 ulp).
inline __m512 ExpNonPositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // exp underflows to 0 below this anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

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
