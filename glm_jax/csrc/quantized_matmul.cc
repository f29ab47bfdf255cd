// y [M, O] = x [M, K] @ W.T for W = q * scale in GLM-130B's quantized layout (quantize/format.py): q int8 [O, K]
// (8 bits) or [O, K/2] (4 bits: byte i of a row holds column 2i in its high nibble and 2i+1 in its low one, both
// signed), scales [O, G] (float32 here) for groups of K/G columns.
//
// For decoding (the wrapper sends up to 16 rows of x): a decode step is bound by the bytes of weights it reads, so
// each weight is read once, converted to float in registers (8 at a time: sign-extend, shift the nibbles out, convert)
// and multiplied into up to 8 rows of x at once. Each group's vector sums are scaled by one FMA into the row's total;
// one horizontal sum per output. Integer weights times float32 x, summed in float32, scaled per group: the exact
// dequantized product up to float32 summation order. Output rows are split over helper threads (parallel.h).
//
// On a CPU with VNNI, vnni_matmul.cc's integer products take over (the attribute `path` picks one for tests): for INT4
// about twice the float path's speed per core, so that a decode step is bound by memory again.
#include <immintrin.h>

#include <cpuid.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vnni_matmul.h"
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

// The paths: 1 the float kernels above (any AVX2 CPU), 2 integer dot products on 256-bit vectors (AVX-VNNI), 4 on
// 512-bit vectors (AVX-512 VNNI), as a mask of what this CPU and its OS support.
int PathMask() {
  unsigned a, b, c, d;
  int mask = 1;
#if !defined(GLM_JAX_NO_VNNI)
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return mask;  // OSXSAVE: xgetbv is there
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const bool ymm = (lo & 0x6) == 0x6, zmm = (lo & 0xE6) == 0xE6;  // the OS saves the vector registers
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return mask;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) && (c & (1u << 11));  // F BW VL VNNI
  if (zmm && avx512) mask |= 4;
  if (ymm && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4))) mask |= 2;  // AVX-VNNI
#endif
  return mask;
}

// x as vnni_matmul.h's digits: per row, the power of two that brings its largest |x| into [2^21, 2^22), x rounded
// to integers m there (half to even), m's digits, and each group's offset.
struct VnniDigits {
  std::vector<int8_t, AlignedAllocator<int8_t>> digits;
  std::vector<int64_t> offsets;
  std::vector<double> unscale;
  std::vector<uint8_t> bad;
};

// The digits of eight integers m, digit d's eight bytes stored at out + d * step. Returns, widened to int64, what the
// group's offset counts of them: m (INT4), the top digit (INT8).
template <int Bits>
inline __m256i put_digits8(__m256i r, int8_t* out, int64_t step) {
  const __m256i counted = Bits == 4 ? r : _mm256_srai_epi32(r, 16);
  const __m256i gather = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4), zero = _mm256_setzero_si256();
  for (int64_t d = 0; d < vnni::kDigits; ++d, out += step) {
    const bool unsigned_digit = Bits == 8 && d < vnni::kDigits - 1;
    __m256i digit;
    if (Bits == 4) {  // balanced: r - digit is a multiple of 256
      digit = _mm256_srai_epi32(_mm256_slli_epi32(r, 24), 24);
      r = _mm256_srai_epi32(_mm256_sub_epi32(r, digit), 8);
    } else {
      digit = unsigned_digit ? _mm256_and_si256(r, _mm256_set1_epi32(0xFF)) : r;
      r = _mm256_srai_epi32(r, 8);
    }
    const __m256i words = _mm256_packs_epi32(digit, digit);
    const __m256i packed = unsigned_digit ? _mm256_packus_epi16(words, zero) : _mm256_packs_epi16(words, zero);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(packed, gather)));
  }
  return _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(counted)),
                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(counted, 1)));
}

template <int Bits>
inline int64_t put_digits(int64_t r, int8_t* out, int64_t step) {
  const int64_t counted = Bits == 4 ? r : r >> 16;
  for (int64_t d = 0; d < vnni::kDigits; ++d, out += step) {
    if (Bits == 4) {
      const int8_t digit = int8_t(uint8_t(r & 0xFF));
      *out = digit;
      r = (r - digit) >> 8;
    } else {
      *out = d < vnni::kDigits - 1 ? int8_t(uint8_t(r & 0xFF)) : int8_t(r);
      r >>= 8;
    }
  }
  return counted;
}

template <int Bits>
void FillDigits(const float* x, int64_t M, int64_t K, VnniProblem& P, VnniDigits& X) {
  constexpr int64_t parities = Bits == 4 ? 2 : 1;  // INT4: a byte meets two columns of x, split by parity
  constexpr int64_t offset_unit = Bits == 4 ? 8 : 128 * 65536;
  P.parities = parities;
  P.padded = (P.group_bytes + vnni::kPad - 1) / vnni::kPad * vnni::kPad;
  P.stride = P.G * P.padded;
  const int64_t step = parities * P.stride;  // from one digit's bytes to the next one's
  X.digits.assign(M * vnni::kDigits * step, 0);
  X.offsets.assign(M * P.G, 0);
  X.unscale.assign(M, 1.0);
  X.bad.assign(M, 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float largest = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(xm[k]);
      finite &= a <= std::numeric_limits<float>::max();
      largest = a > largest ? a : largest;
    }
    X.bad[m] = !finite;
    if (!finite || largest == 0.0f) continue;
    int e;
    std::frexp(largest, &e);
    const int shift = vnni::kBits - e;
    const double factor = std::ldexp(1.0, shift);  // x * factor is exact in double
    X.unscale[m] = std::ldexp(1.0, -shift);
    const bool in_float = shift >= -126 && shift <= 127;  // and in float, up to values that round to 0
    const __m256 factor8 = _mm256_set1_ps(in_float ? std::ldexp(1.0f, shift) : 0.0f);
    auto integers8 = [factor8](__m256 v) { return _mm256_cvtps_epi32(_mm256_mul_ps(v, factor8)); };
    for (int64_t g = 0; g < P.G; ++g) {
      const float* xg = xm + parities * g * P.group_bytes;
      int8_t* out = X.digits.data() + m * vnni::kDigits * step + g * P.padded;
      __m256i sum8 = _mm256_setzero_si256();
      int64_t j = 0;
      for (; in_float && j + 8 <= P.group_bytes; j += 8) {
        if (Bits == 4) {  // x's columns 2j .. 2j + 15, even ones and odd ones
          const __m256 a = _mm256_loadu_ps(xg + 2 * j), b = _mm256_loadu_ps(xg + 2 * j + 8);
          const __m256 even = _mm256_castpd_ps(
              _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
          const __m256 odd = _mm256_castpd_ps(
              _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
          sum8 = _mm256_add_epi64(sum8, put_digits8<4>(integers8(even), out + j, step));
          sum8 = _mm256_add_epi64(sum8, put_digits8<4>(integers8(odd), out + P.stride + j, step));
        } else {
          sum8 = _mm256_add_epi64(sum8, put_digits8<8>(integers8(_mm256_loadu_ps(xg + j)), out + j, step));
        }
      }
      alignas(32) int64_t lanes[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum8);
      int64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
      for (; j < P.group_bytes; ++j)
        for (int64_t p = 0; p < parities; ++p)
          sum += put_digits<Bits>(int64_t(std::nearbyint(double(xg[parities * j + p]) * factor)),
                                  out + p * P.stride + j, step);
      X.offsets[m * P.G + g] = offset_unit * sum;
    }
  }
  P.digits = X.digits.data(), P.offsets = X.offsets.data(), P.unscale = X.unscale.data(), P.bad = X.bad.data();
}

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                           ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t path) {
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
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(4, (O + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (O + chunk - 1) / chunk;
  if (M == 0 || O == 0) return ffi::Error::Success();
  static const int mask = PathMask();  // cpuid once: in a guest each one exits to the hypervisor
  // by default the fastest this CPU has; int32 digit sums cannot overflow up to 2^19 bytes a group
  if (path == 0) path = qd[1] / G > (int64_t(1) << 19) ? 1 : (mask & 4) ? 4 : (mask & 2) ? 2 : 1;
  if (path != 1 && path != 2 && path != 4)
    return ffi::Error::InvalidArgument("glm_jax_quantized_matmul: path must be 0 (auto), 1, 2 or 4");
  if (!(mask & path))
    return ffi::Error::InvalidArgument("glm_jax_quantized_matmul: this CPU lacks the requested path");
  if (path != 1) {
    VnniProblem P{int(bits), q.typed_data(), scale.typed_data(), O, G, qd[1], qd[1] / G};
    P.y = y->typed_data();
    VnniDigits X;
    if (bits == 4)
      FillDigits<4>(x.typed_data(), M, K, P, X);
    else
      FillDigits<8>(x.typed_data(), M, K, P, X);
    parallel_chunks(pool, chunks, [P, chunk, M, path](int64_t i) {
      const int64_t begin = i * chunk, end = std::min(P.O, (i + 1) * chunk);
#if !defined(GLM_JAX_NO_VNNI)
      if (path == 4)
        glm_vnni_zmm::products(P, M, begin, end);
      else
        glm_vnni_ymm::products(P, M, begin, end);
#endif
    });
    return ffi::Error::Success();
  }
  QProblem P{x.typed_data(), nullptr, q.typed_data(), scale.typed_data(), M, O, G, qd[1], qd[1] / G, K,
             y->typed_data()};
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

extern "C" int GlmQuantizedPaths() { return PathMask(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlmQuantizedMatmul, QuantizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("path"));
