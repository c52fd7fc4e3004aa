// Routing plan on CUDA (host-side launchers). Torch-free: raw device pointers, sizes, the stream
// as an integer handle and a workspace allocated by the caller. Launchers return the
// cudaError_t of the launch as an int; they never synchronise and never allocate, so the plan
// can be built inside a CUDA graph capture.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe::cuda {

// Each warp keeps one int32 counter per expert in shared memory (at most 32 KiB per block).
constexpr int64_t kRouteMaxExperts = 8192;
// T * K (and the per-chunk counter table, about T * K + E entries) must index with int32.
constexpr int64_t kRouteMaxSlots = (int64_t(1) << 31) - (int64_t(1) << 16);

// Workspace bytes that route() needs for these sizes (a host-side query; no stream work).
// drop: 0 position, 1 score; wdtype: dtype code of the weights (f32 or f64; used by the score
// policy with a capacity only). Returns the cudaError_t of the CUB size queries.
int route_workspace_size(int64_t T, int64_t K, int64_t E, int64_t capacity, int drop, int wdtype,
                         size_t* bytes);

// Same plan as cpu::route (capacity < 0: dropless): counts_E, kept_E, offsets_E1, row_slot_N,
// slot_row_TK, rows of one expert contiguous and in flat slot order. Expert ids outside [0, E)
// cannot raise without a host sync: they are skipped (not counted in counts_E, slot_row -1).
int route(const int32_t* experts, int64_t T, int64_t K, int64_t E, int64_t capacity, int drop,
          const void* weights, int wdtype, int64_t N, int32_t* counts, int32_t* kept,
          int32_t* offsets, int32_t* row_slot, int32_t* slot_row, void* workspace,
          size_t workspace_bytes, intptr_t stream);

}  // namespace moe::cuda
