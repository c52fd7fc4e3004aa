// Routing plan on CUDA: a stable counting sort of the (token, slot) pairs by expert, on device,
// with no host synchronisation.
//
// The flat slots are cut into chunks of `chunk` consecutive items; one warp owns a chunk and
// keeps a private per-expert counter array in shared memory.
//   1. count:   each warp counts its chunk's items per expert -> table[e * C + c].
//   2. scan:    exclusive sum of the expert-major table (CUB), so base[e * C + c] is the sorted
//               position of chunk c's first item of expert e; base[E * C] is the total.
//   3. totals:  counts_E, kept_E = min(counts, capacity), offsets_E1 (one block).
//   4. rank:    each warp walks its chunk again in order, 32 items at a time; __match_any_sync
//               groups the lanes of one expert, so an item's rank inside its expert is
//               (base[e C + c] - base[e C]) + items of e earlier in the chunk + earlier peers.
//               Rank < capacity keeps the item at row offsets[e] + rank.
//   5. pad:     rows [offsets[E], N) get row_slot -1.
// Ranks follow the walk order, so rows of one expert are in flat slot order (stable).
//
// Score dropping (capacity >= 0, drop = 1) keeps the `capacity` largest weights per expert,
// ties to the lower slot: a stable CUB radix sort of the slots by descending weight, then the
// passes above walk the slots in that order and mark the first `capacity` of every expert
// (keep flags), then walk them again in slot order, counting only marked items, to place the
// kept rows in slot order.
//
// Expert ids outside [0, E) take part in nothing: not counted, slot_row -1.
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/cub.cuh>

#include "common.h"
#include "cuda/route.h"

namespace moe::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kTotalsThreads = 1024;
constexpr int kPadThreads = 256;
constexpr int64_t kPadMaxBlocks = 4096;
constexpr int64_t kSharedCounters = 8192;  // int32 counters per block: 32 KiB
constexpr size_t kAlign = 256;

// The sequence one pass walks: item j is slot seq[j] (or j without seq); it takes part when its
// expert id is in [0, E) and, with keep flags, when keep[slot] is set.
struct Items {
  const int32_t* experts;
  const int32_t* seq;
  const uint8_t* keep;
  int64_t S;
  int E;

  // Expert of item j (-1: takes no part); slot receives its slot index (-1 past the end).
  __device__ __forceinline__ int expert_of(int64_t j, int32_t& slot) const {
    slot = -1;
    if (j >= S) return -1;
    slot = seq != nullptr ? seq[j] : static_cast<int32_t>(j);
    const int32_t e = experts[slot];
    if (e < 0 || e >= E) return -1;
    if (keep != nullptr && keep[slot] == 0) return -1;
    return e;
  }
};

__global__ void chunk_count_kernel(Items items, int64_t chunk, int64_t C,
                                   int32_t* __restrict__ table) {
  extern __shared__ int32_t counters[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (blockIdx.x == 0 && threadIdx.x == 0) table[int64_t(items.E) * C] = 0;  // total's slot
  const int64_t c = blockIdx.x * int64_t(blockDim.x >> 5) + warp;
  if (c >= C) return;  // the whole warp
  int32_t* cnt = counters + int64_t(warp) * items.E;
  for (int e = lane; e < items.E; e += 32) cnt[e] = 0;
  __syncwarp();
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < items.S ? begin + chunk : items.S;
  for (int64_t j0 = begin; j0 < end; j0 += 32) {  // warp-uniform loop
    int32_t slot;
    const int e = items.expert_of(j0 + lane < end ? j0 + lane : items.S, slot);
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();
  }
  for (int e = lane; e < items.E; e += 32) table[int64_t(e) * C + c] = cnt[e];
}

// mark == false: place items with rank < capacity (capacity < 0: all) at row offsets[e] + rank
// (slot_row, row_slot), slot_row -1 for the others. mark == true: keep_out[slot] = whether the
// item has rank < capacity.
__global__ void chunk_rank_kernel(Items items, int64_t chunk, int64_t C,
                                  const int32_t* __restrict__ base, int64_t capacity, bool mark,
                                  const int32_t* __restrict__ offsets, int64_t N,
                                  int32_t* __restrict__ row_slot, int32_t* __restrict__ slot_row,
                                  uint8_t* __restrict__ keep_out) {
  extern __shared__ int32_t counters[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = blockIdx.x * int64_t(blockDim.x >> 5) + warp;
  if (c >= C) return;  // the whole warp
  int32_t* cnt = counters + int64_t(warp) * items.E;
  for (int e = lane; e < items.E; e += 32)
    cnt[e] = base[int64_t(e) * C + c] - base[int64_t(e) * C];
  __syncwarp();
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < items.S ? begin + chunk : items.S;
  for (int64_t j0 = begin; j0 < end; j0 += 32) {  // warp-uniform loop
    const bool here = j0 + lane < end;
    int32_t slot;
    const int e = items.expert_of(here ? j0 + lane : items.S, slot);
    const unsigned peers = __match_any_sync(kFull, e);
    const int32_t rank = e >= 0 ? cnt[e] + __popc(peers & lower_lanes) : -1;
    __syncwarp();  // every lane has read its counter before the leaders advance them
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();
    if (!here) continue;
    const bool keep = e >= 0 && (capacity < 0 || rank < capacity);
    if (mark) {
      keep_out[slot] = keep ? 1 : 0;
    } else if (keep) {
      const int32_t row = offsets[e] + rank;
      slot_row[slot] = row;
      if (row < N) row_slot[row] = slot;
    } else {
      slot_row[slot] = -1;
    }
  }
}

// counts_E, kept_E and offsets_E1 from the scanned table (one block).
__global__ void __launch_bounds__(kTotalsThreads)
    totals_kernel(const int32_t* __restrict__ base, int64_t C, int E, int64_t capacity,
                  int32_t* __restrict__ counts, int32_t* __restrict__ kept,
                  int32_t* __restrict__ offsets) {
  using Scan = cub::BlockScan<int32_t, kTotalsThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  int32_t carry = 0;
  for (int e0 = 0; e0 < E; e0 += kTotalsThreads) {
    const int e = e0 + static_cast<int>(threadIdx.x);
    int32_t k = 0;
    if (e < E) {
      const int32_t n = base[int64_t(e + 1) * C] - base[int64_t(e) * C];
      k = capacity < 0 || n <= capacity ? n : static_cast<int32_t>(capacity);
      counts[e] = n;
      kept[e] = k;
    }
    int32_t before, total;
    Scan(scan_tmp).ExclusiveSum(k, before, total);
    if (e < E) offsets[e] = carry + before;
    carry += total;
    __syncthreads();  // scan_tmp is reused by the next tile
  }
  if (threadIdx.x == 0) offsets[E] = carry;
}

__global__ void pad_kernel(const int32_t* __restrict__ offsets, int E, int64_t N,
                           int32_t* __restrict__ row_slot) {
  const int64_t used = offsets[E];
  for (int64_t r = used + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < N;
       r += int64_t(gridDim.x) * blockDim.x)
    row_slot[r] = -1;
}

// Radix keys that sort ascending in the order "weight descending, NaN last"; -0 and +0 tie.
__device__ __forceinline__ uint32_t descending_key(float w) {
  if (isnan(w)) return 0xffffffffu;
  const uint32_t u = w == 0.f ? 0u : __float_as_uint(w);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

__device__ __forceinline__ uint64_t descending_key(double w) {
  if (isnan(w)) return ~uint64_t(0);
  const uint64_t u = w == 0.0 ? 0ull : static_cast<uint64_t>(__double_as_longlong(w));
  const uint64_t sign = uint64_t(1) << 63;
  const uint64_t ascending = (u & sign) ? ~u : (u | sign);
  return ~ascending;
}

template <typename W, typename Key>
__global__ void score_keys_kernel(const W* __restrict__ weights, int64_t S,
                                  Key* __restrict__ keys, int32_t* __restrict__ slots) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < S;
       i += int64_t(gridDim.x) * blockDim.x) {
    keys[i] = descending_key(weights[i]);
    slots[i] = static_cast<int32_t>(i);
  }
}

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Sizes and workspace layout of one call.
struct Layout {
  int64_t S = 0, E = 0, chunk = 0, C = 0, warps = 0, table = 0;
  bool by_score = false, wide_keys = false;
  size_t counts_at = 0, base_at = 0, temp_at = 0, temp_bytes = 0;
  size_t keys_in_at = 0, keys_out_at = 0, slots_in_at = 0, slots_out_at = 0, keep_at = 0;
  size_t total = 0;
};

template <typename Key> cudaError_t sort_bytes(int64_t n, size_t* bytes) {
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const Key*>(nullptr),
                                         static_cast<Key*>(nullptr),
                                         static_cast<const int32_t*>(nullptr),
                                         static_cast<int32_t*>(nullptr), static_cast<int>(n));
}

cudaError_t make_layout(int64_t T, int64_t K, int64_t E, int64_t capacity, int drop, int wdtype,
                        Layout* l) {
  l->S = T * K;
  l->E = E;
  if (l->S == 0) return cudaSuccess;  // nothing to sort: no workspace
  // About 128 items per chunk for every 128 experts keeps the table near S + E entries.
  l->chunk = 32 * 4 * ((E + 127) / 128);
  l->C = (l->S + l->chunk - 1) / l->chunk;
  l->warps = kSharedCounters / E < 8 ? (kSharedCounters / E > 0 ? kSharedCounters / E : 1) : 8;
  l->table = E * l->C + 1;
  l->by_score = drop == 1 && capacity >= 0;
  l->wide_keys = wdtype == kFloat64;

  size_t scan = 0, sort = 0;
  cudaError_t err = cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr),
                                                  static_cast<int>(l->table));
  if (err != cudaSuccess) return err;
  if (l->by_score) {
    err = l->wide_keys ? sort_bytes<uint64_t>(l->S, &sort) : sort_bytes<uint32_t>(l->S, &sort);
    if (err != cudaSuccess) return err;
  }
  l->temp_bytes = scan > sort ? scan : sort;
  const size_t table_bytes = align_up(sizeof(int32_t) * size_t(l->table));
  size_t at = 0;
  l->counts_at = at;
  at += table_bytes;
  l->base_at = at;
  at += table_bytes;
  l->temp_at = at;
  at += align_up(l->temp_bytes);
  if (l->by_score) {
    const size_t key_bytes = align_up((l->wide_keys ? 8 : 4) * size_t(l->S));
    const size_t slot_bytes = align_up(sizeof(int32_t) * size_t(l->S));
    l->keys_in_at = at;
    at += key_bytes;
    l->keys_out_at = at;
    at += key_bytes;
    l->slots_in_at = at;
    at += slot_bytes;
    l->slots_out_at = at;
    at += slot_bytes;
    l->keep_at = at;
    at += align_up(size_t(l->S));
  }
  l->total = at;
  return cudaSuccess;
}

}  // namespace

int route_workspace_size(int64_t T, int64_t K, int64_t E, int64_t capacity, int drop, int wdtype,
                         size_t* bytes) {
  *bytes = 0;
  if (T < 0 || K < 1 || E < 1 || E > kRouteMaxExperts || T * K > kRouteMaxSlots)
    return static_cast<int>(cudaErrorInvalidValue);
  Layout l;
  const cudaError_t err = make_layout(T, K, E, capacity, drop, wdtype, &l);
  if (err == cudaSuccess) *bytes = l.total;
  return static_cast<int>(err);
}

int route(const int32_t* experts, int64_t T, int64_t K, int64_t E, int64_t capacity, int drop,
          const void* weights, int wdtype, int64_t N, int32_t* counts, int32_t* kept,
          int32_t* offsets, int32_t* row_slot, int32_t* slot_row, void* workspace,
          size_t workspace_bytes, intptr_t stream) {
  if (T < 0 || K < 1 || E < 1 || E > kRouteMaxExperts || T * K > kRouteMaxSlots || N < 0)
    return static_cast<int>(cudaErrorInvalidValue);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  Layout l;
  cudaError_t err = make_layout(T, K, E, capacity, drop, wdtype, &l);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (workspace_bytes < l.total) return static_cast<int>(cudaErrorInvalidValue);
  if (l.by_score && (weights == nullptr || (wdtype != kFloat32 && wdtype != kFloat64)))
    return static_cast<int>(cudaErrorInvalidValue);

  if (l.S == 0) {  // no slots: empty experts, every row padding
    if ((err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * E, s)) != cudaSuccess ||
        (err = cudaMemsetAsync(kept, 0, sizeof(int32_t) * E, s)) != cudaSuccess ||
        (err = cudaMemsetAsync(offsets, 0, sizeof(int32_t) * (E + 1), s)) != cudaSuccess)
      return static_cast<int>(err);
    if (N > 0) err = cudaMemsetAsync(row_slot, 0xff, sizeof(int32_t) * N, s);
    return static_cast<int>(err);
  }

  auto* ws = static_cast<unsigned char*>(workspace);
  auto* table = reinterpret_cast<int32_t*>(ws + l.counts_at);
  auto* base = reinterpret_cast<int32_t*>(ws + l.base_at);
  void* temp = ws + l.temp_at;
  const int threads = static_cast<int>(32 * l.warps);
  const int blocks = static_cast<int>((l.C + l.warps - 1) / l.warps);
  const size_t shared = sizeof(int32_t) * size_t(l.warps) * size_t(E);
  const int E32 = static_cast<int>(E);

  auto count_and_scan = [&](const Items& items) -> cudaError_t {
    chunk_count_kernel<<<blocks, threads, shared, s>>>(items, l.chunk, l.C, table);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    size_t temp_bytes = l.temp_bytes;
    return cub::DeviceScan::ExclusiveSum(temp, temp_bytes, table, base,
                                         static_cast<int>(l.table), s);
  };
  auto totals = [&]() -> cudaError_t {
    totals_kernel<<<1, kTotalsThreads, 0, s>>>(base, l.C, E32, capacity, counts, kept, offsets);
    return cudaGetLastError();
  };
  auto rank = [&](const Items& items, int64_t cap, bool mark, uint8_t* keep_out) -> cudaError_t {
    chunk_rank_kernel<<<blocks, threads, shared, s>>>(items, l.chunk, l.C, base, cap, mark,
                                                      offsets, N, row_slot, slot_row, keep_out);
    return cudaGetLastError();
  };

  const Items in_slot_order{experts, nullptr, nullptr, l.S, E32};
  if (!l.by_score) {
    if ((err = count_and_scan(in_slot_order)) != cudaSuccess || (err = totals()) != cudaSuccess ||
        (err = rank(in_slot_order, capacity, false, nullptr)) != cudaSuccess)
      return static_cast<int>(err);
  } else {
    auto* slots_in = reinterpret_cast<int32_t*>(ws + l.slots_in_at);
    auto* slots_out = reinterpret_cast<int32_t*>(ws + l.slots_out_at);
    auto* keep = reinterpret_cast<uint8_t*>(ws + l.keep_at);
    const int key_blocks = static_cast<int>((l.S + 255) / 256 < 4096 ? (l.S + 255) / 256 : 4096);
    size_t temp_bytes = l.temp_bytes;
    if (l.wide_keys) {
      auto* kin = reinterpret_cast<uint64_t*>(ws + l.keys_in_at);
      auto* kout = reinterpret_cast<uint64_t*>(ws + l.keys_out_at);
      score_keys_kernel<<<key_blocks, 256, 0, s>>>(static_cast<const double*>(weights), l.S, kin,
                                                   slots_in);
      if ((err = cudaGetLastError()) != cudaSuccess) return static_cast<int>(err);
      err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, kin, kout, slots_in, slots_out,
                                            static_cast<int>(l.S), 0, 64, s);
    } else {
      auto* kin = reinterpret_cast<uint32_t*>(ws + l.keys_in_at);
      auto* kout = reinterpret_cast<uint32_t*>(ws + l.keys_out_at);
      score_keys_kernel<<<key_blocks, 256, 0, s>>>(static_cast<const float*>(weights), l.S, kin,
                                                   slots_in);
      if ((err = cudaGetLastError()) != cudaSuccess) return static_cast<int>(err);
      err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, kin, kout, slots_in, slots_out,
                                            static_cast<int>(l.S), 0, 32, s);
    }
    if (err != cudaSuccess) return static_cast<int>(err);
    // Walk in descending-weight order: counts, kept, offsets, and mark the first `capacity`
    // items of every expert.
    const Items by_weight{experts, slots_out, nullptr, l.S, E32};
    if ((err = count_and_scan(by_weight)) != cudaSuccess || (err = totals()) != cudaSuccess ||
        (err = rank(by_weight, capacity, true, keep)) != cudaSuccess)
      return static_cast<int>(err);
    // Walk in slot order over the marked items only: rows in slot order.
    const Items marked{experts, nullptr, keep, l.S, E32};
    if ((err = count_and_scan(marked)) != cudaSuccess ||
        (err = rank(marked, -1, false, nullptr)) != cudaSuccess)
      return static_cast<int>(err);
  }
  if (N > 0) {
    const int64_t want = (N + kPadThreads - 1) / kPadThreads;
    pad_kernel<<<static_cast<int>(want < kPadMaxBlocks ? want : kPadMaxBlocks), kPadThreads, 0,
                 s>>>(offsets, E32, N, row_slot);
    err = cudaGetLastError();
  }
  return static_cast<int>(err);
}

}  // namespace moe::cuda
