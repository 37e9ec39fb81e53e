// The order rule of the construction's two mode products (paper eq. 2), shared by the CPU
// library and the CUDA binding. Plain C++ (no torch, no CUDA), the twin of apsfast/_order.py.
#pragma once

#include <cstdint>

namespace apsfast {

// Multiply-adds per kernel element of each order (apsfast._order._costs).
inline int64_t p_first_macs(int64_t C_out, int64_t c_o, int64_t C_in, int64_t c_i) {
  return c_o * C_out * C_in + c_o * C_in * c_i;
}
inline int64_t q_first_macs(int64_t C_out, int64_t c_o, int64_t C_in, int64_t c_i) {
  return C_out * C_in * c_i + c_o * C_out * c_i;
}

// Whether the output-side product (P [C_out, c_o]) goes before the input-side one
// (Q [C_in, c_i]): the cheaper order. On a tie the input-side product
// takes the smaller operand (P first where c_o <= C_out): the CPU library runs it as a batch of
// small GEMMs or as one GEMM after a copy of its operand (apsfast/_order.py says why).
inline bool p_first(int64_t C_out, int64_t c_o, int64_t C_in, int64_t c_i) {
  const int64_t p_cost = p_first_macs(C_out, c_o, C_in, c_i), q_cost = q_first_macs(C_out, c_o, C_in, c_i);
  return p_cost < q_cost || (p_cost == q_cost && c_o <= C_out);
}

// Multiply-adds per kernel element in the order p_first picks (apsfast._order.construct_macs).
inline int64_t construct_macs(int64_t C_out, int64_t c_o, int64_t C_in, int64_t c_i) {
  const int64_t p_cost = p_first_macs(C_out, c_o, C_in, c_i), q_cost = q_first_macs(C_out, c_o, C_in, c_i);
  return p_cost < q_cost ? p_cost : q_cost;
}

}  // namespace apsfast
