// The integer products (vnni_matmul.h): compiled once with -mavxvnni (256-bit vectors, namespace glm_vnni_ymm) and
// once with -mavx512vnni (512-bit, GLM_VNNI_ZMM, glm_vnni_zmm). Nothing here runs before quantized_matmul.cc has
// checked that the CPU has the instructions.
#include <immintrin.h>

#include <cstring>
#include <limits>

#include "vnni_matmul.h"

#if defined(GLM_VNNI_ZMM)
namespace glm_vnni_zmm {
#else
namespace glm_vnni_ymm {
#endif
namespace {

#if defined(GLM_VNNI_ZMM)
using VI = __m512i;
using VF = __m512;
constexpr int64_t W = 64;  // weight bytes per step
inline VI load(const void* p) { return _mm512_loadu_si512(p); }
inline VI load_part(const int8_t* p, int64_t n) {  // n < W bytes, the rest zero; never touches bytes past n
  return _mm512_maskz_loadu_epi8(_cvtu64_mask64((uint64_t(1) << n) - 1), p);
}
inline VI dot(VI acc, VI u8, VI s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
inline VI bytes(int v) { return _mm512_set1_epi8(char(v)); }
inline VI and_(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI xor_(VI a, VI b) { return _mm512_xor_si512(a, b); }
inline VI add(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI shift4(VI v) { return _mm512_srli_epi16(v, 4); }
inline VI zero() { return _mm512_setzero_si512(); }
inline VF to_float(VI a) { return _mm512_cvtepi32_ps(a); }
inline VF fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF splat(float f) { return _mm512_set1_ps(f); }
inline VF zero_f() { return _mm512_setzero_ps(); }
inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
#else
using VI = __m256i;
using VF = __m256;
constexpr int64_t W = 32;
inline VI load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VI load_part(const int8_t* p, int64_t n) {
  alignas(32) int8_t part[32] = {};
  std::memcpy(part, p, n);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
}
inline VI dot(VI acc, VI u8, VI s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
inline VI bytes(int v) { return _mm256_set1_epi8(char(v)); }
inline VI and_(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI xor_(VI a, VI b) { return _mm256_xor_si256(a, b); }
inline VI add(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI shift4(VI v) { return _mm256_srli_epi16(v, 4); }
inline VI zero() { return _mm256_setzero_si256(); }
inline VF to_float(VI a) { return _mm256_cvtepi32_ps(a); }
inline VF fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF splat(float f) { return _mm256_set1_ps(f); }
inline VF zero_f() { return _mm256_setzero_ps(); }
inline float hsum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Weight bytes requested this far ahead of each stream: one core alone streamed 14 GB/s of INT8 weights from memory
// without, 27 GB/s with (the hardware prefetchers keep too few lines in flight for S streams here).
constexpr int64_t kAhead = 1024;
constexpr int D = vnni::kDigits;

// One step: W weight bytes (n < W at a group's end: Part) of S output rows against MB rows of x, whose digits are
// loaded once for the S rows (vnni_matmul.h: which operand is unsigned).
template <int Bits, int MB, int S, bool Part>
inline void step(const int8_t* const* q, int64_t b, int64_t n, const int8_t* const* x, int64_t stride,
                 VI (&acc)[MB][S][D]) {
  constexpr int parities = Bits == 4 ? 2 : 1;
  VI xd[MB][D][parities];
  for (int m = 0; m < MB; ++m)
    for (int d = 0; d < D; ++d)
      for (int p = 0; p < parities; ++p) xd[m][d][p] = load(x[m] + (d * parities + p) * stride + b);
  for (int s = 0; s < S; ++s) {
    if (!Part) _mm_prefetch(reinterpret_cast<const char*>(q[s] + b + kAhead), _MM_HINT_T0);
    const VI w = Part ? load_part(q[s] + b, n) : load(q[s] + b);
    if constexpr (Bits == 4) {
      const VI low = bytes(0x0F), v = xor_(w, bytes(0x88));  // both nibbles + 8
      const VI lo = and_(v, low), hi = and_(shift4(v), low);
      for (int m = 0; m < MB; ++m)
        for (int d = 0; d < D; ++d) acc[m][s][d] = dot(dot(acc[m][s][d], hi, xd[m][d][0]), lo, xd[m][d][1]);
    } else {
      const VI w128 = xor_(w, bytes(0x80));  // w + 128, for the signed top digit
      for (int m = 0; m < MB; ++m) {
        for (int d = 0; d < D - 1; ++d) acc[m][s][d] = dot(acc[m][s][d], xd[m][d][0], w);
        acc[m][s][D - 1] = dot(acc[m][s][D - 1], w128, xd[m][D - 1][0]);
      }
    }
  }
}

// `count` sets of S output rows (o0 + i + s * stride_o, read side by side) against rows [m_begin, m_end) of x, MB
// at a time.
template <int Bits, int MB, int S>
__attribute__((noinline)) void rows(const VnniProblem& P, int64_t o0, int64_t count, int64_t stride_o,
                                    int64_t m_begin, int64_t m_end) {
  const int64_t full = P.group_bytes / W * W;
  for (int64_t i = 0; i < count; ++i)
    for (int64_t m0 = m_begin; m0 < m_end; m0 += MB) {
      int64_t o[S];
      const int8_t* q[S];
      VF total[MB][S];
      double offset[MB][S];  // sum over groups of scale * the group's offset, taken off at the end
      for (int s = 0; s < S; ++s) {
        o[s] = o0 + i + s * stride_o;
        for (int m = 0; m < MB; ++m) total[m][s] = zero_f(), offset[m][s] = 0.0;
      }
      for (int64_t g = 0; g < P.G; ++g) {
        const int8_t* x[MB];
        for (int m = 0; m < MB; ++m) x[m] = P.digits + (m0 + m) * D * P.parities * P.stride + g * P.padded;
        for (int s = 0; s < S; ++s) q[s] = P.q + o[s] * P.row_bytes + g * P.group_bytes;
        VI acc[MB][S][D];
        for (int m = 0; m < MB; ++m)
          for (int s = 0; s < S; ++s)
            for (int d = 0; d < D; ++d) acc[m][s][d] = zero();
        int64_t b = 0;
        for (; b < full; b += W) step<Bits, MB, S, false>(q, b, W, x, P.stride, acc);
        if (b < P.group_bytes) step<Bits, MB, S, true>(q, b, P.group_bytes - b, x, P.stride, acc);
        for (int s = 0; s < S; ++s) {
          const float scale = P.scale[o[s] * P.G + g];
          for (int m = 0; m < MB; ++m) {
            VF f = to_float(acc[m][s][D - 1]);  // the digit sums are exact integers; 256-ary Horner in float32
            for (int d = D - 2; d >= 0; --d) f = fma(f, splat(256.0f), to_float(acc[m][s][d]));
            total[m][s] = fma(f, splat(scale), total[m][s]);
            offset[m][s] += double(scale) * double(P.offsets[(m0 + m) * P.G + g]);
          }
        }
      }
      for (int m = 0; m < MB; ++m)
        for (int s = 0; s < S; ++s) {
          const int64_t row = m0 + m;
          P.y[row * P.O + o[s]] = P.bad[row] ? std::numeric_limits<float>::quiet_NaN()
                                             : float((double(hsum(total[m][s])) - offset[m][s]) * P.unscale[row]);
        }
    }
}

// Output rows [begin, end) in S runs side by side, then the rest one by one.
template <int Bits, int MB, int S>
void rows_in_streams(const VnniProblem& P, int64_t begin, int64_t end, int64_t m_begin, int64_t m_end) {
  const int64_t per = (end - begin) / S, rest = begin + S * per;
  rows<Bits, MB, S>(P, begin, per, per, m_begin, m_end);
  rows<Bits, MB, 1>(P, rest, end - rest, 0, m_begin, m_end);
}

template <int Bits>
void run(const VnniProblem& P, int64_t m_count, int64_t begin, int64_t end) {
#if defined(GLM_VNNI_ZMM)  // 32 vector registers: x's digits for one or two rows, 12 sums
  const int64_t twos = m_count / 2 * 2;
  if (twos) rows_in_streams<Bits, 2, 2>(P, begin, end, 0, twos);
  if (m_count > twos) rows_in_streams<Bits, 1, 4>(P, begin, end, twos, m_count);
#else  // 16 registers
  rows_in_streams<Bits, 1, 2>(P, begin, end, 0, m_count);
#endif
}

}  // namespace

void products(const VnniProblem& P, int64_t m_count, int64_t begin, int64_t end) {
  if (P.bits == 4)
    run<4>(P, m_count, begin, end);
  else
    run<8>(P, m_count, begin, end);
}

}  // namespace glm_vnni_ymm / glm_vnni_zmm
