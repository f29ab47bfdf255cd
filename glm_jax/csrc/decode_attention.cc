// One decode step of GLM attention on CPU: each of the R = B*N rows attends with its single query over the columns
// of its key/value cache that its mask allows, reading only those columns.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Reading one sequential stream at a time, a core gets about 60% of its memory bandwidth here; with several streams
// side by side (at the granularity of a column or two) much more. So a step takes the rows (heads of one sequence,
// which share its columns) in groups of kGroup and reads their keys, then their values, column by column side by side.
constexpr int kGroup = 4;

// exp(x) for 8 floats: x = n*ln2 + r with |r| <= ln2/2, e^r = 1 + r + r^2 P(r) with P of degree 5 (the Cephes expf
// coefficients, about 1 ulp), 2^n through the exponent bits; below about -87.3 the result is 0.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// [sum(a0), ..., sum(a7)]
inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

struct Problem {
  const float *q, *k, *v;
  const bool* mask;
  float c, masked_score;  // scores are scaled by c; a masked one is masked_score * c
  int64_t rows, heads, T, H;
  float* out;
};

// Lanes C*g + i (C = 8 / G columns, i < C): q_g . k_g[cols[i]] for the G <= 8 rows g (heads of one sequence, so
// the same columns); lanes from C*G on are 0. HV = H / 8 when known at compile time, else 0.
template <int G, int HV>
inline __m256 scores(const float* const* q, const float* const* k, const int32_t* cols, int64_t H) {
  constexpr int C = 8 / G;
  const int64_t hv = HV > 0 ? HV : H / 8;
  int64_t col[C];
  for (int i = 0; i < C; ++i) col[i] = cols[i] * H;
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t u = 0; u < hv; ++u)
    for (int g = 0; g < G; ++g) {
      const __m256 qu = _mm256_loadu_ps(q[g] + 8 * u);
      for (int i = 0; i < C; ++i)
        a[C * g + i] = _mm256_fmadd_ps(qu, _mm256_loadu_ps(k[g] + col[i] + 8 * u), a[C * g + i]);
    }
  return reduce8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
}

// out_g[h0, h0 + 8W) += sum over j < n of p_g[j] * v_g[cols[j], h0 + ...) for the G rows, a column of each row in
// turn. With G = 4 and W = 8 half of the 32 accumulators live on the stack: still faster than two passes over half
// the head each, which read every column twice.
template <int G, int W>
inline void values(const float* const* v, const float* const* p, float* const* out, const int32_t* cols, int64_t n,
                   int64_t H, int64_t h0) {
  __m256 acc[G][W];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < W; ++u) acc[g][u] = _mm256_loadu_ps(out[g] + h0 + 8 * u);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t col = cols[j] * H + h0;
    for (int g = 0; g < G; ++g) {
      const __m256 pj = _mm256_broadcast_ss(p[g] + j);
      for (int u = 0; u < W; ++u) acc[g][u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v[g] + col + 8 * u), acc[g][u]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < W; ++u) _mm256_storeu_ps(out[g] + h0 + 8 * u, acc[g][u]);
}

// Softmax in place over the n scores in s (then 8 more slots, set here to weigh 0). With `mask` (the general path)
// they are all T columns and the masked ones get the fill; without, the T - n columns left out are masked ones whose
// weight exp(fill - max) must vanish: false when it does not, and the caller takes the general path.
inline bool softmax(float* s, int64_t n, int64_t T, float fill, const bool* mask) {
  // A masked column scores masked_score*c (SAT: -10000*c), so its weight is exactly 0 unless every allowed score is
  // within ~88 of it.
  if (mask)
    for (int64_t t = 0; t < n; ++t)
      if (!mask[t]) s[t] = fill;
  for (int64_t i = n; i < n + 8; ++i) s[i] = -INFINITY;  // the tail block's discarded lanes weigh 0
  __m256 vmax = _mm256_set1_ps(n < T ? fill : -INFINITY);
  for (int64_t i = 0; i < n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float m = lanes[0];
  for (float x : lanes) m = std::max(m, x);
  if (n < T && std::exp(fill - m) != 0.0f) return false;
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  _mm256_storeu_ps(lanes, vsum);
  float sum = 0.0f;
  for (float x : lanes) sum += x;
  const __m256 vs = _mm256_set1_ps(sum);
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(s + i, _mm256_div_ps(_mm256_loadu_ps(s + i), vs));
  return true;
}

// Rows r0 .. r0+G-1 (G <= kGroup, one sequence: the same columns) over the columns `cols` (n of them, then 8 copies
// of the last, so that a block of scores may run past n): their keys side by side, softmax, their values side by
// side. s: scratch of G * (T + 8) floats. ok[g] says whether row g's result stands (see softmax); with `mask` (the
// general path) G is 1 and cols are all T columns.
template <int G, int HV>
void attend_group(const Problem& P, int64_t r0, const int32_t* cols, int64_t n, float* s, const bool* mask, bool* ok) {
  constexpr int C = 8 / G;  // columns per block of scores
  const int64_t T = P.T, H = P.H;
  const float *q[G], *k[G], *v[G], *p[G];
  float *sg[G], *out[G];
  for (int g = 0; g < G; ++g) {
    q[g] = P.q + (r0 + g) * H;
    k[g] = P.k + (r0 + g) * T * H;
    v[g] = P.v + (r0 + g) * T * H;
    p[g] = sg[g] = s + g * (T + 8);
    out[g] = P.out + (r0 + g) * H;
  }
  const __m256 c = _mm256_set1_ps(P.c);
  float lanes[8];
  for (int64_t j = 0; j < n; j += C) {
    _mm256_storeu_ps(lanes, _mm256_mul_ps(scores<G, HV>(q, k, cols + j, H), c));
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < C; ++i) sg[g][j + i] = lanes[C * g + i];
  }
  for (int g = 0; g < G; ++g) {
    ok[g] = softmax(sg[g], n, T, P.masked_score * P.c, mask);
    std::fill_n(out[g], H, 0.0f);
  }
  int64_t h0 = 0;
  for (; h0 + 64 <= H; h0 += 64) values<G, 8>(v, p, out, cols, n, H, h0);
  for (; h0 < H; h0 += 8) values<G, 1>(v, p, out, cols, n, H, h0);
}

// Rows [begin, end) in groups of up to kGroup rows of one sequence. A row whose masked columns would carry weight (or
// that has no allowed column) is redone on its own over every column, with the fill at the masked ones.
template <int HV>
void attend_rows(const Problem& P, int64_t begin, int64_t end) {
  const int64_t T = P.T;
  std::vector<int32_t> cols(T + 8), every(T + 8);
  for (int64_t t = 0; t < T + 8; ++t) every[t] = static_cast<int32_t>(std::min<int64_t>(t, T - 1));
  std::vector<float> s(kGroup * (T + 8));
  bool ok[kGroup];
  int64_t n = 0;
  for (int64_t r0 = begin; r0 < end;) {
    const int64_t b = r0 / P.heads;
    const bool* mask = P.mask + b * T;
    if (r0 == begin || r0 % P.heads == 0) {  // a new sequence: its allowed columns
      n = 0;
      for (int64_t t = 0; t < T; ++t)
        if (mask[t]) cols[n++] = static_cast<int32_t>(t);
      for (int64_t i = n; i < n + 8; ++i) cols[i] = n ? cols[n - 1] : 0;
    }
    const int64_t G = std::min({int64_t{kGroup}, end - r0, (b + 1) * P.heads - r0});
    if (n) {
      static_assert(kGroup == 4, "the dispatch below covers groups of up to 4 rows");
      if (G == 4) attend_group<4, HV>(P, r0, cols.data(), n, s.data(), nullptr, ok);
      else if (G == 3) attend_group<3, HV>(P, r0, cols.data(), n, s.data(), nullptr, ok);
      else if (G == 2) attend_group<2, HV>(P, r0, cols.data(), n, s.data(), nullptr, ok);
      else attend_group<1, HV>(P, r0, cols.data(), n, s.data(), nullptr, ok);
    }
    for (int64_t g = 0; g < G; ++g)
      if (!n || !ok[g]) attend_group<1, HV>(P, r0 + g, every.data(), T, s.data(), mask, ok);
    r0 += G;
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> scale,
                           float masked_score, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 2 || kd.size() != 3 || vd.size() != 3 || md.size() != 2 || kd[0] != qd[0] || kd[2] != qd[1] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || md[1] != kd[1] || md[0] == 0 || kd[0] % md[0] != 0 ||
      kd[2] % 8 != 0 || kd[1] == 0 || scale.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "glm_jax_decode_attention: expected q [R, H], k and v [R, T, H], mask [B, T] with B dividing R, H a multiple of "
        "8, and a scalar scale");
  const Problem P{q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), scale.typed_data()[0],
                  masked_score, kd[0], kd[0] / md[0], kd[1], kd[2], out->typed_data()};
  // about four chunks per thread, of whole groups
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = (std::max<int64_t>(1, P.rows / (4 * threads)) + kGroup - 1) / kGroup * kGroup;
  parallel_chunks(pool, (P.rows + chunk - 1) / chunk, [P, chunk](int64_t i) {
    const int64_t begin = i * chunk, end = std::min(P.rows, begin + chunk);
    if (P.H == 64) attend_rows<8>(P, begin, end);
    else attend_rows<0>(P, begin, end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlmDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("masked_score")
                                  .Ret<ffi::Buffer<ffi::F32>>());
