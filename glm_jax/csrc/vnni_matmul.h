// INT8 / INT4 products in integer dot-product instructions (VNNI), for CPUs that have them. vnni_matmul.cc is compiled
// twice: with AVX-VNNI on 256-bit vectors (namespace glm_vnni_ymm) and with AVX-512 VNNI on 512-bit ones
// (glm_vnni_zmm); quantized_matmul.cc prepares x, checks the CPU and calls one of them.
//
// Why integers: converting each weight to float before an FMA takes more instructions than a decode step has time
// for at the memory's speed (the float kernel reads INT4 at about half of what one core could stream). A dot-product
// instruction multiplies 32 (64) weight bytes by 32 (64) bytes of x at once with no conversion, so x goes in as
// integers: each row of x is scaled by a power of two that brings its largest |x| into [2^21, 2^22) and rounded to
// integers m (half to even). The rounding moves each x by at most 2^-22 of its row's largest |x|: about one float32
// rounding of the largest element, the order of the float32 summation error the float kernel has anyway. m goes in as
// three base-256 digits, each digit's products summed exactly in int32; a group's three sums are combined in float32
// lanes and scaled; the row's power of two comes off at the end.
//
// The instruction multiplies unsigned bytes by signed ones:
// - INT4: the digits are signed (each in [-128, 127]); the weights unsigned: each nibble XOR 8 is its value + 8
//   (0..15), and the + 8 comes off once per group as 8 * (the group's sum of m).
// - INT8: the weights are signed; the two low digits unsigned (0..255); the top digit signed (m >> 16, in [-64, 63])
//   meets the weight XOR 0x80 (its value + 128), which comes off as 128 * 65536 * (the group's sum of top digits).
#pragma once

#include <cstdint>

struct VnniProblem {
  int bits;             // 4 or 8
  const int8_t* q;      // [O, row_bytes]; INT4: two weights a byte, the even column in the high nibble
  const float* scale;   // [O, G]
  int64_t O, G, row_bytes, group_bytes;
  // x as digits: for row m of x, digit d and parity p (INT4: 0 for x's even columns, which meet the high nibbles, 1
  // for the odd ones; INT8: 0 only), digits[((m * kDigits + d) * parities + p) * stride + g * padded + j] = digit d
  // of the x that meets byte j of group g; zero from group_bytes up to padded (a multiple of kPad).
  const int8_t* digits;
  int64_t parities, stride, padded;
  const int64_t* offsets;  // [M, G]: what the weights' + 8 (+ 128) added to each group's integer sum
  const double* unscale;   // [M]: m = round(x / unscale), unscale a power of two
  const uint8_t* bad;      // [M]: x's row holds inf or NaN (its outputs are NaN)
  float* y;                // [M, O]
};

namespace vnni {
constexpr int64_t kDigits = 3;
constexpr int kBits = 22;  // |m| < 2^22
constexpr int64_t kPad = 64;
}  // namespace vnni

namespace glm_vnni_ymm {
void products(const VnniProblem& P, int64_t m_count, int64_t begin, int64_t end);
}
namespace glm_vnni_zmm {
void products(const VnniProblem& P, int64_t m_count, int64_t begin, int64_t end);
}
