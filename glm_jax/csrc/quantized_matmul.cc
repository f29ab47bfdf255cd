// y [M, O] = x [M, K] @ W.T for W = q * scale in GLM-130B's quantized layout (quantize/format.py): q int8 [O, K]
// (8 bits) or [O, K/2] (4 bits: byte i of a row holds column 2i in its high nibble and 2i+1 in its low one, both
// signed), scales [O, G] (float32 here) for groups of K/G columns.
//
// For decoding (the wrapper sends up to 16 rows of x): a decode step is bound by the bytes of weights it reads, so
// each weight is read once, converted to float in registers (8 at a time: sign-extend, shift the nibbles out, convert)
// and multiplied into up to 8 rows of x at once. Each group's vector sums are scaled by one FMA into the row's total;
// one horizontal sum per output. Integer weights times float32 x, summed in float32, scaled per group: the exact
// dequantized product up to float32 summation order. Output rows are split over XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct QProblem {
  const float* xa;  // 8 bits: x [M, K]; 4 bits: x's even columns [M, K/2]
  const float* xb;  // 4 bits: x's odd columns [M, K/2]
  const int8_t* q;
  const float* scale;
  int64_t M, O, G;
  int64_t row_bytes, group_bytes;  // bytes of q per row and per group
  int64_t ldx;                      // floats per row of xa / xb
  float* y;
  const float* odd_sums;  // 4 bits: per row of x and group, the sum of xb over the group's whole 8-byte steps [M, G]
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256i load8_sign_extended(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// `count` groups of S output rows (row o0 + i + s * stride for s < S) against the rows [m_begin, m_end) of x, MB at a
// time (m_end - m_begin a multiple of MB), while the group's weights are in cache. The S rows are
// read side by side: one sequential stream reaches about a third of a core's bandwidth here, several nearly all of it.
// H: accumulators per (row of x, output row), for FMA latency: INT4 keeps its high and low nibbles apart (H = 2) or
// adds both into one; INT8 sums two consecutive vectors apart (H = 2) or one at a time.
template <int Bits, int MB, int S, int H>
__attribute__((noinline)) void rows(const QProblem& P, int64_t o0, int64_t count, int64_t stride, int64_t m_begin,
                                    int64_t m_end) {
  constexpr int64_t step = Bits == 8 ? 8 * H : 8;  // bytes of q per step and output row
  for (int64_t i = 0; i < count; ++i)
  for (int64_t m0 = m_begin; m0 < m_end; m0 += MB) {
    const int8_t* qr[S];
    int64_t o[S];
    for (int s = 0; s < S; ++s) o[s] = o0 + i + s * stride, qr[s] = P.q + o[s] * P.row_bytes;
    __m256 total[MB][S];
    float total_tail[MB][S];
    for (int m = 0; m < MB; ++m)
      for (int s = 0; s < S; ++s) total[m][s] = _mm256_setzero_ps(), total_tail[m][s] = 0.0f;
    for (int64_t g = 0; g < P.G; ++g) {
      const int64_t b0 = g * P.group_bytes, b1 = b0 + P.group_bytes;
      __m256 acc[MB][S][H];
      for (int m = 0; m < MB; ++m)
        for (int s = 0; s < S; ++s)
          for (int h = 0; h < H; ++h) acc[m][s][h] = _mm256_setzero_ps();
      int64_t b = b0;
      // Each weight vector is converted right before its FMAs (x for every row loaded first), which keeps all the
      // accumulators in registers (16 ymm under AVX2).
      for (; b + step <= b1; b += step) {
        if constexpr (Bits == 8) {
          for (int h = 0; h < H; ++h) {
            __m256 xv[MB];
            for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(P.xa + (m0 + m) * P.ldx + b + 8 * h);
            for (int s = 0; s < S; ++s) {
              const __m256 w = _mm256_cvtepi32_ps(load8_sign_extended(qr[s] + b + 8 * h));
              for (int m = 0; m < MB; ++m) acc[m][s][h] = _mm256_fmadd_ps(w, xv[m], acc[m][s][h]);
            }
          }
        } else {
          // v = the sign-extended byte with bit 3 flipped: its high nibble (v >> 4) is still the even column's
          // value, and v - 16 * (v >> 4) is the odd column's value + 8, both exact in float; the + 8 comes off once
          // per group (8 * the group's sum of odd x). Two conversions, one shift and three FMAs per 16 weights, where
          // extracting the low nibble with shifts took three shifts: the shifts share the FMA units' ports.
          const __m256i flip = _mm256_set1_epi32(8);
          const __m256 sixteen = _mm256_set1_ps(16.0f);
          __m256 xe = _mm256_setzero_ps(), xo = xe;  // one row of x: loaded once for the S output rows
          if constexpr (MB == 1) xe = _mm256_loadu_ps(P.xa + m0 * P.ldx + b), xo = _mm256_loadu_ps(P.xb + m0 * P.ldx + b);
          for (int s = 0; s < S; ++s) {
            const __m256i v = _mm256_xor_si256(load8_sign_extended(qr[s] + b), flip);
            const __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));
            const __m256 lo = _mm256_fnmadd_ps(sixteen, hi, _mm256_cvtepi32_ps(v));
            for (int m = 0; m < MB; ++m) {
              const int64_t at = (m0 + m) * P.ldx + b;
              const __m256 e = MB == 1 ? xe : _mm256_loadu_ps(P.xa + at);
              const __m256 d = MB == 1 ? xo : _mm256_loadu_ps(P.xb + at);
              acc[m][s][0] = _mm256_fmadd_ps(hi, e, acc[m][s][0]);
              acc[m][s][H - 1] = _mm256_fmadd_ps(lo, d, acc[m][s][H - 1]);
            }
          }
        }
      }
      for (int s = 0; s < S; ++s) {
        const float scale = P.scale[o[s] * P.G + g];
        const __m256 sv = _mm256_set1_ps(scale);
        for (int m = 0; m < MB; ++m) {
          __m256 sum = acc[m][s][0];
          for (int h = 1; h < H; ++h) sum = _mm256_add_ps(sum, acc[m][s][h]);
          total[m][s] = _mm256_fmadd_ps(sum, sv, total[m][s]);
          float tail = 0.0f;  // the group's last bytes, past whole steps
          if constexpr (Bits == 4) tail = -8.0f * P.odd_sums[(m0 + m) * P.G + g];
          for (int64_t t = b; t < b1; ++t) {
            const int64_t at = (m0 + m) * P.ldx + t;
            if constexpr (Bits == 8) {
              tail += float(qr[s][t]) * P.xa[at];
            } else {
              tail += float(qr[s][t] >> 4) * P.xa[at] + float(int8_t(qr[s][t] << 4) >> 4) * P.xb[at];
            }
          }
          total_tail[m][s] += tail * scale;
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int s = 0; s < S; ++s) P.y[(m0 + m) * P.O + o[s]] = hsum(total[m][s]) + total_tail[m][s];
  }
}

// Output rows [begin, end) in S runs side by side, then the remainder one by one; rows [m_begin, m_end) of x.
template <int Bits, int MB, int S, int H>
void rows_in_streams(const QProblem& P, int64_t begin, int64_t end, int64_t m_begin, int64_t m_end) {
  const int64_t per = (end - begin) / S, rest = begin + S * per;
  rows<Bits, MB, S, H>(P, begin, per, per, m_begin, m_end);
  rows<Bits, MB, 1, 2>(P, rest, end - rest, 0, m_begin, m_end);
}

// Blocks of 4 rows of x (each weight, once converted, meets 4 rows; each row of x, once loaded, 2 weight rows: an x
// that outgrows L1 is read from L2 at half the rate an 8-row block would need), then 2, then 1. About 8 accumulators.
template <int Bits>
void run_rows(const QProblem& P, int64_t begin, int64_t end) {
  const int64_t fours = P.M / 4 * 4, twos = fours + (P.M - fours) / 2 * 2;
  if (fours) rows_in_streams<Bits, 4, 2, 1>(P, begin, end, 0, fours);
  if (twos > fours) rows_in_streams<Bits, 2, 2, 2>(P, begin, end, fours, twos);
  if (P.M > twos) rows_in_streams<Bits, 1, 4, 2>(P, begin, end, twos, P.M);
}

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                           ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (bits != 4 && bits != 8)
    return ffi::Error::InvalidArgument("glm_jax_quantized_matmul: bits must be 4 or 8");
  const int64_t per_byte = 8 / bits;
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || yd.size() != 2 || qd[1] * per_byte != xd[1] ||
      sd[0] != qd[0] || sd[1] < 1 || qd[1] % sd[1] || yd[0] != xd[0] || yd[1] != qd[0])
    return ffi::Error::InvalidArgument(
        "glm_jax_quantized_matmul: expected x [M, K], q [O, K * bits / 8], scale [O, G] (G dividing the bytes of a "
        "row) and y [M, O]");
  const int64_t M = xd[0], K = xd[1], O = qd[0], G = sd[1];
  QProblem P{x.typed_data(), nullptr, q.typed_data(), scale.typed_data(), M, O, G, qd[1], qd[1] / G, K,
             y->typed_data()};
  if (M == 0 || O == 0) return ffi::Error::Success();
  std::vector<float> halves, odd_sums;
  if (bits == 4) {  // x's even and odd columns, once for every chunk
    const int64_t K2 = K / 2;
    halves.resize(2 * M * K2);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K2; ++k) {
        halves[m * K2 + k] = P.xa[m * K + 2 * k];
        halves[M * K2 + m * K2 + k] = P.xa[m * K + 2 * k + 1];
      }
    P.xa = halves.data(), P.xb = halves.data() + M * K2, P.ldx = K2;
    odd_sums.assign(M * G, 0.0f);
    const int64_t steps = P.group_bytes / 8 * 8;  // bytes of a group that the 8-byte steps cover
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.0f;
        for (int64_t k = g * P.group_bytes; k < g * P.group_bytes + steps; ++k) sum += P.xb[m * K2 + k];
        odd_sums[m * G + g] = sum;
      }
    P.odd_sums = odd_sums.data();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(4, (O + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (O + chunk - 1) / chunk;
  parallel_chunks(pool, chunks, [P, chunk, bits](int64_t i) {
    const int64_t begin = i * chunk, end = std::min(P.O, (i + 1) * chunk);
    if (bits == 8)
      run_rows<8>(P, begin, end);
    else
      run_rows<4>(P, begin, end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlmQuantizedMatmul, QuantizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits"));
