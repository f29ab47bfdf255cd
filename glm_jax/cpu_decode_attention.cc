// One decode step of GLM attention on CPU: each of the R = B*N rows attends with its single query over the columns
// of its key/value cache that its mask allows, reading only those columns.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kAhead = 16;  // columns prefetched ahead of the one in use

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

inline void prefetch_row(const float* p, int64_t H) {
  for (int64_t b = 0; b < H * 4; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

struct Problem {
  const float *q, *k, *v;
  const bool* mask;
  float c;
  int64_t rows, heads, T, H;
  float* out;
};

// q . k[col] for 8 columns (the caller pads `cols` past its end with repeats of a real column, whose results it
// discards), prefetching the keys kAhead columns ahead. HV = H / 8 when known at compile time, else 0.
template <int HV>
inline __m256 scores8(const float* q, const float* k, const int32_t* cols, int64_t H) {
  const int64_t hv = HV > 0 ? HV : H / 8;
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) prefetch_row(k + cols[j + kAhead] * H, H);
  for (int j0 = 0; j0 < 8; j0 += 4) {
    const float* k0 = k + cols[j0] * H;
    const float* k1 = k + cols[j0 + 1] * H;
    const float* k2 = k + cols[j0 + 2] * H;
    const float* k3 = k + cols[j0 + 3] * H;
    __m256 qu = _mm256_loadu_ps(q);
    __m256 a0 = _mm256_mul_ps(qu, _mm256_loadu_ps(k0)), a1 = _mm256_mul_ps(qu, _mm256_loadu_ps(k1));
    __m256 a2 = _mm256_mul_ps(qu, _mm256_loadu_ps(k2)), a3 = _mm256_mul_ps(qu, _mm256_loadu_ps(k3));
    for (int64_t u = 1; u < hv; ++u) {
      qu = _mm256_loadu_ps(q + 8 * u);
      a0 = _mm256_fmadd_ps(qu, _mm256_loadu_ps(k0 + 8 * u), a0);
      a1 = _mm256_fmadd_ps(qu, _mm256_loadu_ps(k1 + 8 * u), a1);
      a2 = _mm256_fmadd_ps(qu, _mm256_loadu_ps(k2 + 8 * u), a2);
      a3 = _mm256_fmadd_ps(qu, _mm256_loadu_ps(k3 + 8 * u), a3);
    }
    acc[j0] = a0; acc[j0 + 1] = a1; acc[j0 + 2] = a2; acc[j0 + 3] = a3;
  }
  return reduce8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
}

// Row r over the columns `cols` (n of them, then kAhead + 8 copies of the last); s: scratch of T + 8 floats.
// cols are the allowed columns, and the result is false when the masked columns would carry weight. With `mask`
// (the general path) cols are all T columns, and the masked ones score the fill.
template <int HV>
bool attend_row(const Problem& P, int64_t r, const int32_t* cols, int64_t n, float* s, const bool* mask) {
  const int64_t T = P.T, H = P.H;
  const float* q = P.q + r * H;
  const float* k = P.k + r * T * H;
  const float* v = P.v + r * T * H;
  for (int64_t i = 0; i < std::min<int64_t>(n, kAhead); ++i) {
    prefetch_row(k + cols[i] * H, H);
    prefetch_row(v + cols[i] * H, H);
  }
  const __m256 c = _mm256_set1_ps(P.c);
  for (int64_t i = 0; i < n; i += 8) {
    __m256 sc = scores8<HV>(q, k, cols + i, H);
    _mm256_storeu_ps(s + i, _mm256_mul_ps(sc, c));
  }
  // Softmax over all T columns; a masked column scores -10000*c (as SAT), so its weight exp(-10000*c - m) is exactly 0
  // unless every allowed score is within ~88 of it: then the caller takes the general path.
  const float fill = -10000.0f * P.c;
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
  // context: 8 accumulator registers per 64 lanes of the head, the values prefetched kAhead columns ahead
  float* out = P.out + r * H;
  for (int64_t h0 = 0; h0 < H; h0 += 64) {
    const int64_t w = std::min<int64_t>(64, H - h0) / 8;
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 p = _mm256_broadcast_ss(s + j);
      const float* vt = v + cols[j] * H + h0;
      prefetch_row(v + cols[j + kAhead] * H + h0, w * 8);
      for (int u = 0; u < w; ++u) acc[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * u), acc[u]);
    }
    for (int u = 0; u < w; ++u) _mm256_storeu_ps(out + h0 + 8 * u, acc[u]);
  }
  return true;
}

template <int HV>
void attend_rows(const Problem& P, int64_t begin, int64_t end) {
  const int64_t T = P.T;
  std::vector<int32_t> cols(T + kAhead + 8), every(T + kAhead + 8);
  for (int64_t t = 0; t < T + kAhead + 8; ++t) every[t] = static_cast<int32_t>(std::min<int64_t>(t, T - 1));
  std::vector<float> s(T + 8);
  int64_t batch_row = -1, n = 0;
  for (int64_t r = begin; r < end; ++r) {
    const bool* mask = P.mask + (r / P.heads) * T;
    if (r / P.heads != batch_row) {  // the heads of one sequence share its mask
      batch_row = r / P.heads;
      n = 0;
      for (int64_t t = 0; t < T; ++t)
        if (mask[t]) cols[n++] = static_cast<int32_t>(t);
      for (int64_t i = n; i < n + kAhead + 8; ++i) cols[i] = n ? cols[n - 1] : 0;
    }
    if (n == 0 || !attend_row<HV>(P, r, cols.data(), n, s.data(), nullptr))
      attend_row<HV>(P, r, every.data(), T, s.data(), mask);
  }
}

struct Shared {
  Problem problem;
  int64_t chunks, chunk_rows;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
      const int64_t begin = i * chunk_rows, end = std::min(problem.rows, begin + chunk_rows);
      if (problem.H == 64) attend_rows<8>(problem, begin, end);
      else attend_rows<0>(problem, begin, end);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 2 || kd.size() != 3 || vd.size() != 3 || md.size() != 2 || kd[0] != qd[0] || kd[2] != qd[1] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || md[1] != kd[1] || md[0] == 0 || kd[0] % md[0] != 0 ||
      kd[2] % 8 != 0 || kd[1] == 0 || scale.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "glm_jax_decode_attention: expected q [R, H], k and v [R, T, H], mask [B, T] with B dividing R, H a multiple of "
        "8, and a scalar scale");
  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
                            scale.typed_data()[0], kd[0], kd[0] / md[0], kd[1], kd[2], out->typed_data()};
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows = kd[0];
  shared->chunk_rows = std::max<int64_t>(1, rows / (4 * threads));
  shared->chunks = (rows + shared->chunk_rows - 1) / shared->chunk_rows;
  for (int64_t t = 1; t < std::min(threads, shared->chunks); ++t) pool.Schedule([shared] { shared->work(); });
  shared->work();  // the calling thread takes chunks too, so this never waits on an idle pool
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) _mm_pause();
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
                                  .Ret<ffi::Buffer<ffi::F32>>());
