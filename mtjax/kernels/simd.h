// 16-float vectors for mtjax's CPU kernels, on AVX-512 (one zmm register) or AVX2 + FMA (two
// ymm registers), chosen by the compiler flags mtjax/kernels/__init__.py builds with.
//
// Why one 16-lane type for both: the kernels' loops, tails and register transposes are written
// once; AVX2 machines (most x86 laptops and desktops, AMD before Zen 4) get the same kernels,
// with a micro-tile sized for their 16 registers (kTileVectors).
//
// Masks select lanes of a 16-lane vector. The kernels use tail masks (the first n lanes), lanes
// compared, and lanes set in a row of bools.

#ifndef MTJAX_KERNELS_SIMD_H_
#define MTJAX_KERNELS_SIMD_H_

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mtjax_kernels {

#if defined(__AVX512F__) && defined(__AVX512BW__)

inline constexpr const char* kIsa = "avx512";
// Micro-tile columns in 16-float vectors: 6 x 4 accumulators of 32 registers.
inline constexpr int kTileVectors = 4;

struct Vec {
  __m512 v;
};
struct Mask {
  __mmask16 m;
};
struct Index {  // 16 int32 lanes
  __m512i v;
};

inline Mask FullMask() { return {static_cast<__mmask16>(0xFFFF)}; }
inline Mask EmptyMask() { return {static_cast<__mmask16>(0)}; }
// Lanes [s, min(s + 16, n)) of a row of n floats.
inline Mask TailMask(int64_t n, int64_t s) {
  const int64_t left = n - s;
  return {left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1)};
}
inline Mask Or(Mask a, Mask b) { return {static_cast<__mmask16>(a.m | b.m)}; }
// Lanes of b that are not in a.
inline Mask AndNot(Mask a, Mask b) { return {static_cast<__mmask16>(~a.m & b.m)}; }
inline bool Any(Mask a) { return a.m != 0; }

inline Vec Zero() { return {_mm512_setzero_ps()}; }
inline Vec Set(float x) { return {_mm512_set1_ps(x)}; }
inline Vec Load(const float* p) { return {_mm512_loadu_ps(p)}; }
// The mask's lanes from p, zeros elsewhere (nothing outside the mask is read).
inline Vec Load(const float* p, Mask m) { return {_mm512_maskz_loadu_ps(m.m, p)}; }
// The mask's lanes from p, `fill` elsewhere.
inline Vec LoadOr(Vec fill, const float* p, Mask m) {
  return {_mm512_mask_loadu_ps(fill.v, m.m, p)};
}
inline void Store(float* p, Vec x) { _mm512_storeu_ps(p, x.v); }
inline void Store(float* p, Vec x, Mask m) { _mm512_mask_storeu_ps(p, m.m, x.v); }

inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec Max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec MulAdd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }    // a*b+c
inline Vec NegMulAdd(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c-a*b
inline Vec Select(Mask m, Vec if_set, Vec otherwise) {
  return {_mm512_mask_mov_ps(otherwise.v, m.m, if_set.v)};
}
inline float ReduceAdd(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline float ReduceMax(Vec a) { return _mm512_reduce_max_ps(a.v); }

inline Mask Greater(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask Equal(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
inline Mask IsNan(Vec a) { return {_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q)}; }
// Lanes whose bool in p[0..15] is true, within m (nothing outside m is read).
inline Mask LoadBools(const bool* p, Mask m) {
  const __m128i bytes = _mm_maskz_loadu_epi8(m.m, p);
  return {_mm_test_epi8_mask(bytes, bytes)};
}

inline Index SetIndex(int32_t i) { return {_mm512_set1_epi32(i)}; }
inline Index Iota() {
  return {_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)};
}
inline Index operator+(Index a, int32_t b) { return {_mm512_add_epi32(a.v, _mm512_set1_epi32(b))}; }
inline Index Select(Mask m, Index if_set, Index otherwise) {
  return {_mm512_mask_mov_epi32(otherwise.v, m.m, if_set.v)};
}
// The smallest of the mask's lanes (the mask must not be empty).
inline int32_t MinWhere(Mask m, Index a) { return _mm512_mask_reduce_min_epi32(m.m, a.v); }

inline Mask LoadBoolsFull(const bool* p) { return LoadBools(p, FullMask()); }

// n rounded to the nearest integer, and x * 2^n for integral n.
inline Vec Round(Vec x) {
  return {_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Vec ScaleByPowerOfTwo(Vec x, Vec n) { return {_mm512_scalef_ps(x.v, n.v)}; }

inline void Prefetch(const char* p) { _mm_prefetch(p, _MM_HINT_T1); }

// Transposes the 16 x 16 block held in r[0..15] (rows) in registers.
inline void Transpose16(Vec r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i].v, r[i + 1].v);
    t[i + 1] = _mm512_unpackhi_ps(r[i].v, r[i + 1].v);
  }
  // r[4g + j], 128-bit lane L: rows 4g..4g+3 at column j + 4L.
  __m512 u[16];
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 s0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 s1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 s2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 s3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[j].v = _mm512_shuffle_f32x4(s0, s2, 0x88);
    r[j + 4].v = _mm512_shuffle_f32x4(s1, s3, 0x88);
    r[j + 8].v = _mm512_shuffle_f32x4(s0, s2, 0xdd);
    r[j + 12].v = _mm512_shuffle_f32x4(s1, s3, 0xdd);
  }
}

#elif defined(__AVX2__) && defined(__FMA__)

inline constexpr const char* kIsa = "avx2";
// Micro-tile columns in 16-float vectors: 6 x 2 accumulators, 2 for B and 1 for A, of the 16
// ymm registers (the 6 x 16 shape BLIS uses on Haswell).
inline constexpr int kTileVectors = 1;

struct Vec {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
struct Mask {  // all ones in a selected lane
  __m256 lo, hi;
};
struct Index {
  __m256i lo, hi;
};

inline Mask FullMask() {
  const __m256 ones = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  return {ones, ones};
}
inline Mask EmptyMask() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Mask TailMask(int64_t n, int64_t s) {
  const int64_t left = n - s;
  if (left >= 16) return FullMask();
  const __m256i count = _mm256_set1_epi32(static_cast<int>(left));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(count, lanes)),
          _mm256_castsi256_ps(
              _mm256_cmpgt_epi32(count, _mm256_add_epi32(lanes, _mm256_set1_epi32(8))))};
}
inline Mask Or(Mask a, Mask b) { return {_mm256_or_ps(a.lo, b.lo), _mm256_or_ps(a.hi, b.hi)}; }
inline Mask AndNot(Mask a, Mask b) {
  return {_mm256_andnot_ps(a.lo, b.lo), _mm256_andnot_ps(a.hi, b.hi)};
}
inline bool Any(Mask a) { return _mm256_movemask_ps(_mm256_or_ps(a.lo, a.hi)) != 0; }

inline Vec Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec Set(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Vec Load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Vec Load(const float* p, Mask m) {
  return {_mm256_maskload_ps(p, _mm256_castps_si256(m.lo)),
          _mm256_maskload_ps(p + 8, _mm256_castps_si256(m.hi))};
}
inline Vec LoadOr(Vec fill, const float* p, Mask m) {
  const Vec x = Load(p, m);
  return {_mm256_blendv_ps(fill.lo, x.lo, m.lo), _mm256_blendv_ps(fill.hi, x.hi, m.hi)};
}
inline void Store(float* p, Vec x) {
  _mm256_storeu_ps(p, x.lo);
  _mm256_storeu_ps(p + 8, x.hi);
}
inline void Store(float* p, Vec x, Mask m) {
  _mm256_maskstore_ps(p, _mm256_castps_si256(m.lo), x.lo);
  _mm256_maskstore_ps(p + 8, _mm256_castps_si256(m.hi), x.hi);
}

inline Vec operator+(Vec a, Vec b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline Vec operator-(Vec a, Vec b) {
  return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
}
inline Vec operator*(Vec a, Vec b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline Vec Max(Vec a, Vec b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline Vec MulAdd(Vec a, Vec b, Vec c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Vec NegMulAdd(Vec a, Vec b, Vec c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline Vec Select(Mask m, Vec if_set, Vec otherwise) {
  return {_mm256_blendv_ps(otherwise.lo, if_set.lo, m.lo),
          _mm256_blendv_ps(otherwise.hi, if_set.hi, m.hi)};
}
inline float ReduceAdd(Vec a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float ReduceMax(Vec a) {
  const __m256 s = _mm256_max_ps(a.lo, a.hi);
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline Mask Greater(Vec a, Vec b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ)};
}
inline Mask Equal(Vec a, Vec b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_EQ_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_EQ_OQ)};
}
inline Mask IsNan(Vec a) {
  return {_mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q), _mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q)};
}
// Lanes whose byte is not zero.
inline Mask NonZeroBytes(__m128i bytes) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i lo = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), zero);
  const __m256i hi = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), zero);
  return {_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi)};
}
// m must be a tail mask (a prefix of the lanes), as every masked row access here is.
inline Mask LoadBools(const bool* p, Mask m) {
  alignas(16) uint8_t bytes[16] = {};
  std::memcpy(bytes, p, __builtin_popcount(_mm256_movemask_ps(m.lo)) +
                            __builtin_popcount(_mm256_movemask_ps(m.hi)));
  return NonZeroBytes(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes)));
}

inline Index SetIndex(int32_t i) { return {_mm256_set1_epi32(i), _mm256_set1_epi32(i)}; }
inline Index Iota() {
  return {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
          _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)};
}
inline Index operator+(Index a, int32_t b) {
  const __m256i add = _mm256_set1_epi32(b);
  return {_mm256_add_epi32(a.lo, add), _mm256_add_epi32(a.hi, add)};
}
inline Index Select(Mask m, Index if_set, Index otherwise) {
  auto blend = [](__m256i o, __m256i s, __m256 mask) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(o), _mm256_castsi256_ps(s), mask));
  };
  return {blend(otherwise.lo, if_set.lo, m.lo), blend(otherwise.hi, if_set.hi, m.hi)};
}
inline int32_t MinWhere(Mask m, Index a) {
  alignas(32) int32_t values[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(values), a.lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(values + 8), a.hi);
  const int bits = _mm256_movemask_ps(m.lo) | (_mm256_movemask_ps(m.hi) << 8);
  int32_t best = INT32_MAX;
  for (int i = 0; i < 16; ++i)
    if ((bits >> i) & 1) best = values[i] < best ? values[i] : best;
  return best;
}

inline Mask LoadBoolsFull(const bool* p) {
  return NonZeroBytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline Vec Round(Vec x) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, kMode), _mm256_round_ps(x.hi, kMode)};
}
// x * 2^n for integral n in [-126, 127] (what ExpNonPositive asks for), built in the exponent
// bits; n below that range gives 0.
inline Vec ScaleByPowerOfTwo(Vec x, Vec n) {
  auto scale = [](__m256 x, __m256 n) {
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 power = _mm256_and_ps(_mm256_castsi256_ps(bits),
                                       _mm256_cmp_ps(n, _mm256_set1_ps(-127.0f), _CMP_GT_OQ));
    return _mm256_mul_ps(x, power);
  };
  return {scale(x.lo, n.lo), scale(x.hi, n.hi)};
}

inline void Prefetch(const char* p) { _mm_prefetch(p, _MM_HINT_T1); }

// Transposes the 8 x 8 block in r[0..7] (rows) in registers.
inline void Transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// Transposes the 16 x 16 block held in r[0..15] (rows) in registers, as four 8 x 8 blocks.
inline void Transpose16(Vec r[16]) {
  __m256 top_left[8], top_right[8], bottom_left[8], bottom_right[8];
  for (int i = 0; i < 8; ++i) {
    top_left[i] = r[i].lo;
    top_right[i] = r[i].hi;
    bottom_left[i] = r[8 + i].lo;
    bottom_right[i] = r[8 + i].hi;
  }
  Transpose8(top_left);
  Transpose8(top_right);
  Transpose8(bottom_left);
  Transpose8(bottom_right);
  for (int i = 0; i < 8; ++i) {
    r[i] = {top_left[i], bottom_left[i]};
    r[8 + i] = {top_right[i], bottom_right[i]};
  }
}

#else
#error "mtjax's CPU kernels need AVX-512 (F, BW) or AVX2 with FMA"
#endif

// A whole vector, in place of a mask: row loops (ForEachVector) pass it for every 16 lanes but
// a partial last one, so that full vectors take plain loads and stores (AVX2's masked ones are
// slower; AVX-512's cost the same).
struct Full {};
inline Vec Load(const float* p, Full) { return Load(p); }
inline Vec LoadOr(Vec, const float* p, Full) { return Load(p); }
inline void Store(float* p, Vec x, Full) { Store(p, x); }
inline Vec Select(Full, Vec if_set, Vec) { return if_set; }
inline Mask AndNot(Mask a, Full) { return AndNot(a, FullMask()); }
inline Mask LoadBools(const bool* p, Full) { return LoadBoolsFull(p); }

// fn(s, lanes) for s = 0, 16, ... below n: lanes is Full{} for whole vectors and the tail's
// Mask for a partial last one (so fn is generic in it: [&](int64_t s, auto lanes) {...}).
template <typename Fn>
inline void ForEachVector(int64_t n, Fn&& fn) {
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) fn(s, Full{});
  if (s < n) fn(s, TailMask(n, s));
}

// exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, degree-5 polynomial, about 1 ulp).
inline Vec ExpNonPositive(Vec x) {
  // exp underflows to 0 below -104 anyway; on AVX2, 2^n is built for n >= -126 only, so the
  // range there ends at the smallest normal float (about exp(-87.3)), below which it gives 0.
  // -104 first: max_ps returns its second operand where either is NaN, so a NaN stays NaN (a
  // NaN score then makes its row NaN, as in XLA, instead of a probability of 0).
  x = Max(Set(-104.0f), x);
  const Vec n = Round(x * Set(1.44269504088896341f));
  Vec r = NegMulAdd(n, Set(0.693359375f), x);
  r = NegMulAdd(n, Set(-2.12194440e-4f), r);
  Vec p = Set(1.9875691500e-4f);
  p = MulAdd(p, r, Set(1.3981999507e-3f));
  p = MulAdd(p, r, Set(8.3334519073e-3f));
  p = MulAdd(p, r, Set(4.1665795894e-2f));
  p = MulAdd(p, r, Set(1.6666665459e-1f));
  p = MulAdd(p, r, Set(5.0000001201e-1f));
  p = MulAdd(p * r, r, r + Set(1.0f));
  return ScaleByPowerOfTwo(p, n);
}

}  // namespace mtjax_kernels

#endif  // MTJAX_KERNELS_SIMD_H_
