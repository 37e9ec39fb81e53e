// The order rule of the construction's two mode products (paper eq. 2), shared by the CPU
// library and the CUDA binding. Plain C++ (no torch, no CUDA), the twin of apsfast/_order.py.
#pragma once

#include <cstdint>

namespace apsfast {

// Whether the output-side product (P [C_out, c_o]) goes before the input-side one
// (Q [C_in, c_i]). Multiply-adds per kernel element: P first c_o*C_out*C_in + c_o*C_in*c_i,
// Q first C_out*C_in*c_i + c_o*C_out*c_i; the cheaper order, P first on a tie.
inline bool p_first(int64_t C_out, int64_t c_o, int64_t C_in, int64_t c_i) {
  return c_o * C_out * C_in + c_o * C_in * c_i <= C_out * C_in * c_i + c_o * C_out * c_i;
}

// Multiply-adds per kernel element in the order p_first picks (apsfast._order.construct_macs).
inline int64_t construct_macs(int64_t C_out, int64_t c_o, int64_t C_in, int64_t c_i) {
  return p_first(C_out, c_o, C_in, c_i) ? c_o * C_out * C_in + c_o * C_in * c_i
                                        : C_out * C_in * c_i + c_o * C_out * c_i;
}

}  // namespace apsfast
