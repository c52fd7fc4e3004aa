// Routing plan on CPU: counting sort of (token, slot) pairs into expert-contiguous rows, with
// optional capacity dropping. Rows inside an expert keep token order, so results are
// deterministic and independent of the thread count. O(T*K) and memory-bound.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/ops.h"

namespace moe::cpu {

void route(const int32_t* experts, int64_t T, int64_t K, int64_t E, int64_t capacity, int drop,
           const void* weights, int wdtype, int64_t N, int32_t* counts, int32_t* kept,
           int32_t* offsets, int32_t* row_slot, int32_t* slot_row) {
  const int64_t S = T * K;
  std::fill(counts, counts + E, 0);
  for (int64_t i = 0; i < S; ++i) {
    const int32_t e = experts[i];
    if (e < 0 || e >= E)
      throw std::invalid_argument("experts_TK: expected expert ids in [0, " + std::to_string(E) +
                                  "), found " + std::to_string(e) + " at token " +
                                  std::to_string(i / K) + ", slot " + std::to_string(i % K));
    ++counts[e];
  }
  for (int64_t e = 0; e < E; ++e)
    kept[e] = capacity < 0 ? counts[e] : static_cast<int32_t>(std::min<int64_t>(counts[e], capacity));
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + kept[e];
  if (offsets[E] > N)
    throw std::invalid_argument("route: " + std::to_string(offsets[E]) +
                                " kept rows do not fit the " + std::to_string(N) + " allocated");

  // keep[i]: whether (token, slot) i survives capacity. Position policy keeps the first
  // `capacity` in token order; score policy keeps the `capacity` largest weights (ties: earlier).
  std::vector<uint8_t> keep(S, 1);
  if (capacity >= 0 && drop == 1) {
    std::vector<int64_t> start(E + 1, 0), cursor(E);
    for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e];
    std::vector<int64_t> order(S);
    std::copy(start.begin(), start.end() - 1, cursor.begin());
    for (int64_t i = 0; i < S; ++i) order[cursor[experts[i]]++] = i;
    auto w = [&](int64_t i) -> double {
      return wdtype == kFloat64 ? static_cast<const double*>(weights)[i]
                                : static_cast<const float*>(weights)[i];
    };
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] <= capacity) continue;
      auto b = order.begin() + start[e], end = order.begin() + start[e + 1];
      std::vector<int64_t> bucket(b, end);
      // A strict weak order even with NaN: numbers by decreasing weight, then NaN (dropped
      // first, as the reference's sort places them last); ties by earlier slot.
      auto before = [&](int64_t x, int64_t y) {
        const double a = w(x), b = w(y);
        const bool na = std::isnan(a), nb = std::isnan(b);
        if (na != nb) return nb;
        if (!na && a != b) return a > b;
        return x < y;
      };
      std::nth_element(bucket.begin(), bucket.begin() + capacity, bucket.end(), before);
      for (auto it = bucket.begin() + capacity; it != bucket.end(); ++it) keep[*it] = 0;
    }
  }
  std::vector<int32_t> cursor(E, 0);
  for (int64_t i = 0; i < S; ++i) {
    const int32_t e = experts[i];
    const int32_t pos = cursor[e];
    if (keep[i] && pos < kept[e]) {
      const int32_t row = offsets[e] + pos;
      ++cursor[e];
      slot_row[i] = row;
      row_slot[row] = static_cast<int32_t>(i);
    } else {
      slot_row[i] = -1;
    }
  }
  std::fill(row_slot + offsets[E], row_slot + N, -1);
}

}  // namespace moe::cpu
