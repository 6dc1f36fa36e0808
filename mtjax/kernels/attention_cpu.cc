// Fused T5 attention for x86-64 CPUs with AVX-512 or AVX2, as XLA FFI custom calls.
//
// softmax(q k^T + bias) v per (batch, head), float32, with T5's conventions: no score scaling,
// and bias = relative position bias (optional) plus mask_bias (an attribute: mtjax's
// MASK_BIAS) where a boolean mask [B or 1, Q, S] is false, added in that order (the same
// float32 sums as mtjax's XLA path). The position bias depends on key - query only, so it
// comes as its diagonals [H, Q + S - 1]: bias[h, q, s] = diagonals[h, s - q + Q - 1], each
// query row a contiguous slice (4 KB per head at T5's lengths, where the full [H, Q, S] table
// streamed megabytes through the cache), and its gradient as the sums along those diagonals.
//
// Why: XLA:CPU computes attention as separate ops that each write a [B, H, Q, S] float32 array
// to memory (scores, probabilities, their gradients); with head dim 64 those products run at a
// third of the matmul peak. Here each block of query rows keeps its [rows, S] scores in the
// core's cache: the forward pass writes only the output and two numbers per row, and the
// backward pass recomputes the probabilities from them (FlashAttention's scheme, without the
// online rescaling: a whole row of scores fits in cache at T5's lengths).
//
// Layouts (row-major): q [B, Q, H, K], k and v [B, S, H, K], out [B, Q, H, K], and per query
// row its score maximum and 1 / sum of exponentials, stats [B, H, Q, 2]. (Not one log-sum-exp:
// a fully masked row's scores are near MASK_BIAS, where a float32 sum absorbs the log.)
// Built and loaded at run time by mtjax/kernels/__init__.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
// Inside mtjax_kernels: ParallelFor (cpu_common.h), the 16-float vectors and their
// operations (simd.h).
namespace mtjax_kernels {
namespace {

constexpr int kRowBlock = 64;      // query rows whose [rows, S] scores stay in cache
constexpr int kMR = 6;             // micro-tile rows
constexpr int kNV = kTileVectors;  // micro-tile columns, in 16-float vectors (simd.h)
static_assert(kNV == 1 || kNV == 4, "TileFor makes micro-tiles of 1 or 4 vectors");

// ---------------------------------------------------------------------------------------------
// C[M, N] (+)= A[M, K] B[K, N] with A(i, k) = a[i * ars + k * acs] (any strides: transposed
// operands need no copy), B rows contiguous: B(k, j) = b[k * brs + j], C(i, j) = c[i * crs + j].

template <int MR, int NV, bool kTail>
void MicroTile(int K, const float* a, long ars, long acs, const float* b, long brs, float* c,
               long crs, Mask tail, bool accumulate) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = Zero();
  for (int k = 0; k < K; ++k) {
    const float* brow = b + k * brs;
    Vec bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      bv[j] = (kTail && j == NV - 1) ? Load(brow + 16 * j, tail) : Load(brow + 16 * j);
    const float* acol = a + k * acs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec av = Set(acol[i * ars]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = MulAdd(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* p = c + i * crs + 16 * j;
      Vec r = acc[i][j];
      if (kTail && j == NV - 1) {
        if (accumulate) r = r + Load(p, tail);
        Store(p, r, tail);
      } else {
        if (accumulate) r = r + Load(p);
        Store(p, r);
      }
    }
}

using TileFn = void (*)(int, const float*, long, long, const float*, long, float*, long, Mask,
                        bool);

template <int MR, bool kTail>
constexpr TileFn TileFor(int nv) {
  if constexpr (kNV == 1) {
    return &MicroTile<MR, 1, kTail>;
  } else {
    return nv == 1 ? &MicroTile<MR, 1, kTail> : nv == 2 ? &MicroTile<MR, 2, kTail>
         : nv == 3 ? &MicroTile<MR, 3, kTail> : &MicroTile<MR, 4, kTail>;
  }
}

template <bool kTail>
TileFn TileWithTail(int mr, int nv) {
  switch (mr) {
    case 1: return TileFor<1, kTail>(nv);
    case 2: return TileFor<2, kTail>(nv);
    case 3: return TileFor<3, kTail>(nv);
    case 4: return TileFor<4, kTail>(nv);
    case 5: return TileFor<5, kTail>(nv);
    default: return TileFor<6, kTail>(nv);
  }
}

// The micro-tile for mr rows and nv vectors of columns, the last one partial where `tail`.
TileFn Tile(int mr, int nv, bool tail) {
  return tail ? TileWithTail<true>(mr, nv) : TileWithTail<false>(mr, nv);
}

void Gemm(int M, int N, int K, const float* a, long ars, long acs, const float* b, long brs,
          float* c, long crs, bool accumulate) {
  for (int j0 = 0; j0 < N; j0 += 16 * kNV) {
    const int width = std::min(16 * kNV, N - j0);
    const int nv = (width + 15) / 16;
    const bool has_tail = width % 16 != 0;
    const Mask tail = TailMask(width, 16 * (nv - 1));
    const TileFn full = Tile(kMR, nv, has_tail);
    for (int i0 = 0; i0 < M; i0 += kMR) {
      const int mr = std::min(kMR, M - i0);
      const TileFn fn = mr == kMR ? full : Tile(mr, nv, has_tail);
      fn(K, a + i0 * ars, ars, acs, b + j0, brs, c + i0 * crs + j0, crs, tail, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise helpers over one row of n floats.

// scores += position bias (if any) + mask_bias where the mask (if any) is false.
inline void AddBias(float* scores, const float* pos, const bool* mask, float mask_bias, int n) {
  if (pos == nullptr && mask == nullptr) return;
  ForEachVector(n, [&](int64_t s, auto lanes) {
    Vec bias = pos ? Load(pos + s, lanes) : Zero();
    if (mask) {
      const Mask masked = AndNot(LoadBools(mask + s, lanes), lanes);
      // pos + 0 where kept (exactly pos), pos + mask_bias elsewhere: XLA's bias sum.
      bias = Select(masked, bias + Set(mask_bias), bias);
    }
    Store(scores + s, Load(scores + s, lanes) + bias, lanes);
  });
}

inline float RowMax(const float* x, int n) {
  Vec best = Set(-INFINITY);
  ForEachVector(n, [&](int64_t s, auto lanes) {
    best = Max(best, LoadOr(Set(-INFINITY), x + s, lanes));
  });
  return ReduceMax(best);
}

// x = exp(x - shift) in place; returns the sum.
inline float ExpInPlace(float* x, int n, float shift) {
  const Vec sh = Set(shift);
  Vec sum = Zero();
  ForEachVector(n, [&](int64_t s, auto lanes) {
    const Vec e = ExpNonPositive(Load(x + s, lanes) - sh);
    Store(x + s, e, lanes);
    sum = sum + Select(lanes, e, Zero());
  });
  return ReduceAdd(sum);
}

// Asks for `rows` rows of `bytes` each, `stride` bytes apart, to be brought into L2: the mask
// rows a block of queries reads after its score product, which would otherwise stall on L3.
inline void PrefetchRows(const void* base, int rows, long bytes, long stride) {
  if (base == nullptr) return;
  const char* p = static_cast<const char*>(base);
  for (int r = 0; r < rows; ++r)
    for (long offset = 0; offset < bytes; offset += 64)
      Prefetch(p + r * stride + offset);
}

// Per-thread scratch, kept between calls (fresh pages would cost faults on every step).
float* Scratch(int slot, size_t floats) {
  thread_local std::vector<float> buffers[7];
  std::vector<float>& buffer = buffers[slot];
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// [S, K] rows of stride `stride` -> [S, K] contiguous: a head's rows lie 4 * H * K bytes
// apart, so at T5's sizes they all fall into a small share of the L2 cache's sets.
void PackRows(const float* x, long stride, int S, int K, float* out) {
  for (int s = 0; s < S; ++s)
    std::memcpy(out + static_cast<long>(s) * K, x + s * stride, sizeof(float) * K);
}

// [S, K] rows of stride `stride` -> [K, S] contiguous, by 16 x 16 blocks transposed in
// registers (a plain element loop stores each row's floats 4 * S bytes apart, all in a few L1
// sets).
void PackTransposed(const float* x, long stride, int S, int K, float* out) {
  Vec r[16];
  for (int s0 = 0; s0 < S; s0 += 16) {
    const int rows = std::min(16, S - s0);
    const Mask row_mask = TailMask(S, s0);
    ForEachVector(K, [&](int64_t d0, auto columns) {
      for (int t = 0; t < 16; ++t)
        r[t] = t < rows ? Load(x + (s0 + t) * stride + d0, columns) : Zero();
      Transpose16(r);
      const int cols = static_cast<int>(std::min<int64_t>(16, K - d0));
      for (int c = 0; c < cols; ++c) {
        float* column = out + static_cast<long>(d0 + c) * S + s0;
        if (rows == 16) {
          Store(column, r[c]);
        } else {
          Store(column, r[c], row_mask);
        }
      }
    });
  }
}

struct Dims {
  int64_t B, Q, S, H, K;
  bool has_pos, has_mask, mask_per_batch;
};

ffi::Error CheckDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::F32>& pos,
                     const ffi::Buffer<ffi::PRED>& mask, Dims& d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto pd = pos.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2 || md.size() != 3)
    return ffi::Error::InvalidArgument("mtjax attention: wrong ranks");
  d = Dims{qd[0], qd[1], kd[1], qd[2], qd[3], pd[0] > 0, md[0] > 0, md[0] > 1};
  bool ok = kd[0] == d.B && kd[2] == d.H && kd[3] == d.K;
  ok = ok && vd[0] == d.B && vd[1] == d.S && vd[2] == d.H && vd[3] == d.K;
  ok = ok && (!d.has_pos || (pd[0] == d.H && pd[1] == d.Q + d.S - 1));
  ok = ok && (!d.has_mask || ((md[0] == 1 || md[0] == d.B) && md[1] == d.Q && md[2] == d.S));
  if (!ok) return ffi::Error::InvalidArgument("mtjax attention: mismatched shapes");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> pos,
                   ffi::Buffer<ffi::PRED> mask, float mask_bias,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> stats) {
  Dims d;
  if (ffi::Error error = CheckDims(q, k, v, pos, mask, d); error.failure()) return error;
  const long row = d.H * d.K;  // stride between positions of one head
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* pp = d.has_pos ? pos.typed_data() : nullptr;
  const bool* mp = d.has_mask ? mask.typed_data() : nullptr;
  float* op = out->typed_data();
  float* sp = stats->typed_data();

  ParallelFor(pool, static_cast<int>(d.B * d.H), [&](int task) {
    const int64_t b = task / d.H, h = task % d.H;
    const int S = static_cast<int>(d.S), K = static_cast<int>(d.K);
    float* kt = Scratch(0, static_cast<size_t>(K) * S);
    float* scores = Scratch(1, static_cast<size_t>(kRowBlock) * S);
    float* v0 = Scratch(2, static_cast<size_t>(S) * K);
    PackTransposed(kp + (b * d.S * d.H + h) * d.K, row, S, K, kt);
    PackRows(vp + (b * d.S * d.H + h) * d.K, row, S, K, v0);
    for (int64_t i0 = 0; i0 < d.Q; i0 += kRowBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, d.Q - i0));
      const float* q0 = qp + ((b * d.Q + i0) * d.H + h) * d.K;
      float* o0 = op + ((b * d.Q + i0) * d.H + h) * d.K;
      // Query row i's position bias starts at diagonal Q - 1 - i.
      const float* pos0 = pp ? pp + h * (d.Q + d.S - 1) + (d.Q - 1 - i0) : nullptr;
      const bool* mask0 = mp ? mp + ((d.mask_per_batch ? b : 0) * d.Q + i0) * d.S : nullptr;
      PrefetchRows(mask0, rows, d.S, d.S);
      Gemm(rows, S, K, q0, row, 1, kt, S, scores, S, false);
      float inv_sums[kRowBlock];
      for (int r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* srow = scores + static_cast<long>(r) * S;
        AddBias(srow, pos0 ? pos0 - r : nullptr, mask0 ? mask0 + r * d.S : nullptr, mask_bias,
                S);
        const float mx = RowMax(srow, S);
        const float sum = ExpInPlace(srow, S, mx);
        inv_sums[r] = 1.0f / sum;
        sp[2 * ((b * d.H + h) * d.Q + i)] = mx;
        sp[2 * ((b * d.H + h) * d.Q + i) + 1] = inv_sums[r];
      }
      Gemm(rows, K, S, scores, S, 1, v0, K, o0, row, false);
      for (int r = 0; r < rows; ++r) {
        float* orow = o0 + r * row;
        const Vec scale = Set(inv_sums[r]);
        ForEachVector(K, [&](int64_t c, auto lanes) {
          Store(orow + c, Load(orow + c, lanes) * scale, lanes);
        });
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> pos,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> stats,
                    ffi::Buffer<ffi::F32> dout, float mask_bias,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dpos) {
  Dims d;
  if (ffi::Error error = CheckDims(q, k, v, pos, mask, d); error.failure()) return error;
  const long row = d.H * d.K;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* pp = d.has_pos ? pos.typed_data() : nullptr;
  const bool* mp = d.has_mask ? mask.typed_data() : nullptr;
  const float* sp = stats.typed_data();
  const float* gp = dout.typed_data();
  float* dqp = dq->typed_data();
  float* dkp = dk->typed_data();
  float* dvp = dv->typed_data();
  float* dpp = d.has_pos ? dpos->typed_data() : nullptr;

  // One task per head, over every batch row in turn: the head's position-bias gradient is
  // summed over the batch without atomics.
  ParallelFor(pool, static_cast<int>(d.H), [&](int h) {
    const int S = static_cast<int>(d.S), K = static_cast<int>(d.K);
    float* kt = Scratch(0, static_cast<size_t>(K) * S);
    float* probs = Scratch(1, static_cast<size_t>(kRowBlock) * S);
    float* dscores = Scratch(2, static_cast<size_t>(kRowBlock) * S);
    float* vt = Scratch(3, static_cast<size_t>(K) * S);
    float* dk_acc = Scratch(4, static_cast<size_t>(S) * K);
    float* dv_acc = Scratch(5, static_cast<size_t>(S) * K);
    float* k_rows = Scratch(6, static_cast<size_t>(S) * K);
    if (dpp) std::memset(dpp + h * (d.Q + d.S - 1), 0, sizeof(float) * (d.Q + d.S - 1));
    for (int64_t b = 0; b < d.B; ++b) {
      const float* k0 = kp + (b * d.S * d.H + h) * d.K;
      const float* v0 = vp + (b * d.S * d.H + h) * d.K;
      PackTransposed(k0, row, S, K, kt);
      PackTransposed(v0, row, S, K, vt);
      PackRows(k0, row, S, K, k_rows);
      std::memset(dk_acc, 0, sizeof(float) * S * K);
      std::memset(dv_acc, 0, sizeof(float) * S * K);
      for (int64_t i0 = 0; i0 < d.Q; i0 += kRowBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, d.Q - i0));
        const long offset = ((b * d.Q + i0) * d.H + h) * d.K;
        const float* pos0 = pp ? pp + h * (d.Q + d.S - 1) + (d.Q - 1 - i0) : nullptr;
        const bool* mask0 = mp ? mp + ((d.mask_per_batch ? b : 0) * d.Q + i0) * d.S : nullptr;
        float* dpos0 = dpp ? dpp + h * (d.Q + d.S - 1) + (d.Q - 1 - i0) : nullptr;
        PrefetchRows(mask0, rows, d.S, d.S);
        Gemm(rows, S, K, qp + offset, row, 1, kt, S, probs, S, false);
        Gemm(rows, S, K, gp + offset, row, 1, vt, S, dscores, S, false);
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          float* prow = probs + static_cast<long>(r) * S;
          float* drow = dscores + static_cast<long>(r) * S;
          AddBias(prow, pos0 ? pos0 - r : nullptr, mask0 ? mask0 + r * d.S : nullptr,
                  mask_bias, S);
          const float* row_stats = sp + 2 * ((b * d.H + h) * d.Q + i);
          ExpInPlace(prow, S, row_stats[0]);
          // Normalised probabilities P, and D = rowsum(P * dP) over the cached row (the same
          // as dOut . Out, FlashAttention's identity, whose rows lie far apart in memory).
          const Vec inv_sum = Set(row_stats[1]);
          Vec dot = Zero();
          ForEachVector(S, [&](int64_t s, auto lanes) {
            const Vec p = Load(prow + s, lanes) * inv_sum;
            Store(prow + s, p, lanes);
            dot = MulAdd(p, Load(drow + s, lanes), dot);
          });
          const Vec dsum = Set(ReduceAdd(dot));
          float* dposrow = dpos0 ? dpos0 - r : nullptr;
          ForEachVector(S, [&](int64_t s, auto lanes) {
            const Vec ds = Load(prow + s, lanes) * (Load(drow + s, lanes) - dsum);
            Store(drow + s, ds, lanes);
            if (dposrow) Store(dposrow + s, Load(dposrow + s, lanes) + ds, lanes);
          });
        }
        Gemm(rows, K, S, dscores, S, 1, k_rows, K, dqp + offset, row, false);
        Gemm(S, K, rows, dscores, 1, S, qp + offset, row, dk_acc, K, true);
        Gemm(S, K, rows, probs, 1, S, gp + offset, row, dv_acc, K, true);
      }
      for (int s = 0; s < S; ++s) {
        std::memcpy(dkp + ((b * d.S + s) * d.H + h) * d.K, dk_acc + static_cast<long>(s) * K,
                    sizeof(float) * K);
        std::memcpy(dvp + ((b * d.S + s) * d.H + h) * d.K, dv_acc + static_cast<long>(s) * K,
                    sizeof(float) * K);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace mtjax_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtjaxAttentionForward, mtjax_kernels::Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // position bias diagonals
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<float>("mask_bias")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()); // row max, 1 / sum

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtjaxAttentionBackward, mtjax_kernels::Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // position bias diagonals
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // row max, 1 / sum
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d out
                                  .Attr<float>("mask_bias")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dv
                                  .Ret<ffi::Buffer<ffi::F32>>()); // d position diagonals
