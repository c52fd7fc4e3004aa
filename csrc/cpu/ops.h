// CPU kernels of moe_kernels._C. Shape suffixes: T tokens, D model dim, E experts, K top-k,
// N routed rows, G label groups. Index tensors are int32 unless stated; -1 marks "none".
// Data-dependent bad input (NaN logits, out-of-range ids) throws std::invalid_argument, which
// pybind11 turns into ValueError.
#pragma once
#include <cstdint>

namespace moe::cpu {

// Top-k gating. logits_TE (dtype code), bias_E fp32 or null (selection only).
// score: 0 softmax, 1 sigmoid. Writes weights_TK (fp32, or fp64 for fp64 logits), experts_TK.
void topk_gating(const void* logits, int dtype, int64_t T, int64_t E, int64_t K, int score,
                 const float* bias, bool normalize, void* weights, int32_t* experts);

// Routing plan. experts_TK -> counts_E, kept_E, offsets_E1, row_slot_N, slot_row_TK.
// capacity < 0: dropless. drop: 0 position (later tokens dropped first), 1 score (lowest weight
// first, weights_TK fp32/fp64 required). N = number of allocated rows (>= kept total); rows past
// offsets[E] get row_slot = -1.
void route(const int32_t* experts, int64_t T, int64_t K, int64_t E, int64_t capacity, int drop,
           const void* weights, int wdtype, int64_t N, int32_t* counts, int32_t* kept,
           int32_t* offsets, int32_t* row_slot, int32_t* slot_row);

// Dispatch (gather): out_ND[n] = w[row_slot[n]] * x_TD[row_slot[n] / K], zero where row_slot < 0.
// weights (fp32/fp64 by wdtype) may be null (unit weights).
void dispatch(const void* x, int dtype, int64_t T, int64_t D, int64_t K, const int32_t* row_slot,
              int64_t N, const void* weights, int wdtype, void* out);

// Combine: out_TD[t] = sum_k w[t,k] * y_ND[slot_row[t,k]] (k in order, dropped slots skipped).
void combine(const void* y, int dtype, int64_t N, int64_t D, const int32_t* slot_row, int64_t T,
             int64_t K, const void* weights, int wdtype, void* out);

// grad_w_TK[t,k] = <a_TD[t], b_ND[slot_row[t,k]]> (0 when dropped); grad_w dtype = wdtype.
void weight_grad(const void* a, const void* b, int dtype, int64_t T, int64_t D, int64_t K,
                 const int32_t* slot_row, void* grad_w, int wdtype);

// Routing histogram, accumulated in place: counts_GE[label[t], experts[t,k]] += 1 and
// wsum_GE[...] += weights[t,k]. Entries with label < 0 or expert < 0 are skipped.
// labels int64. Deterministic (fixed chunking, ordered reduction).
void routing_histogram(const int32_t* experts, const int64_t* labels, const float* weights,
                       int64_t T, int64_t K, int64_t G, int64_t E, int64_t* counts, float* wsum);

}  // namespace moe::cpu
