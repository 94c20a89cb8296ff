// Host stand-ins of the CUB device algorithms that csrc/cuda/plan_launches.cuh calls, for the CUDA execution
// model (emulation.h). Each keeps the contract the shipped code relies on, not CUB's implementation:
//  * the two-phase temporary-storage protocol: a call with d_temp_storage == nullptr only writes the bytes
//    it needs to temp_storage_bytes; a call with storage and fewer bytes than that returns
//    cudaErrorInvalidValue (CUB's AliasTemporaries), and a call writes every byte it was given, so a buffer
//    smaller than the byte count passed is an overflow that AddressSanitizer reports;
//  * radix sorts: stable; keys compared on bits [begin_bit, end_bit) of CUB's order-preserving bit pattern
//    (signed integers with the sign bit flipped; floats with the sign bit flipped, or every bit for a
//    negative value; -0.0 equal to +0.0); a key outside those bits sorts by its bits alone, as on the device;
//    descending sorts keep equal keys in input order; output ranges must not overlap input ranges;
//  * the segmented sort sorts [d_begin_offsets[s], d_end_offsets[s]) of every segment (an end at or before
//    its begin: empty) and leaves output items outside every segment unwritten;
//  * ExclusiveSum: out[0] = 0, out[i] = in[0] + ... + in[i-1] in the input type (wrapping), in place allowed.
// An argument CUB would misread (negative sizes, bits outside the key, overlapping buffers) fails the test
// with emu::LaunchError naming it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "emulation.h"

namespace cub {
namespace standin {

// The order-preserving unsigned pattern of a key (CUB's RadixSortTwiddle, with -0.0 folded into +0.0).
template <typename Key>
uint64_t ordered_bits(Key key) {
  static_assert(sizeof(Key) <= 8, "keys of up to 64 bits");
  constexpr int kBits = static_cast<int>(sizeof(Key) * 8);
  constexpr uint64_t kSign = uint64_t{1} << (kBits - 1);
  constexpr uint64_t kAll = kBits == 64 ? ~uint64_t{0} : (uint64_t{1} << kBits) - 1;
  uint64_t bits = 0;
  std::memcpy(&bits, &key, sizeof(Key));
  if constexpr (std::is_floating_point_v<Key>) {
    if (bits == kSign) bits = 0;  // -0.0
    return (bits & kSign) != 0 ? ~bits & kAll : bits ^ kSign;
  } else if constexpr (std::is_signed_v<Key>) {
    return (bits ^ kSign) & kAll;
  } else {
    return bits;
  }
}

inline void require(bool ok, const std::string& what) {
  if (!ok) throw emu::LaunchError("CUB stand-in: " + what);
}

inline bool overlap(const void* a, const void* b, size_t bytes) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return bytes > 0 && x < y + bytes && y < x + bytes;
}

// Bytes a call on `items` records of `record_bytes` needs: its records, plus CUB's 256-byte alignment
// slack (not rounded: a query for fewer items than the call always asks for too little).
inline size_t storage_bytes(int64_t items, size_t record_bytes) {
  return static_cast<size_t>(items) * record_bytes + 256;
}

// Phase one (nullptr: report the need) or the check of phase two; true when the caller should do the work.
// The work then writes every given byte, so ASan sees a buffer smaller than temp_storage_bytes.
inline bool storage_protocol(void* d_temp_storage, size_t& temp_storage_bytes, size_t needed, cudaError_t& status) {
  status = cudaSuccess;
  if (d_temp_storage == nullptr) {
    temp_storage_bytes = needed;
    return false;
  }
  if (temp_storage_bytes < needed) {
    status = cudaErrorInvalidValue;
    return false;
  }
  std::memset(d_temp_storage, 0xA5, temp_storage_bytes);
  return true;
}

struct Record {
  uint64_t key;
  int64_t position;
};

// Stable sort of the pairs at positions [begin, end), through records placed in the temporary storage.
template <typename Key, typename Value>
void sort_range(void* storage, const Key* keys_in, Key* keys_out, const Value* values_in, Value* values_out,
                int64_t begin, int64_t end, int begin_bit, int end_bit, bool descending) {
  const int width = end_bit - begin_bit;
  const uint64_t mask = width >= 64 ? ~uint64_t{0} : (uint64_t{1} << width) - 1;
  Record* records = static_cast<Record*>(storage);
  const int64_t n = end - begin;
  for (int64_t i = 0; i < n; ++i) {
    records[i] = Record{(ordered_bits(keys_in[begin + i]) >> begin_bit) & mask, begin + i};
  }
  if (descending) {
    std::stable_sort(records, records + n, [](const Record& a, const Record& b) { return a.key > b.key; });
  } else {
    std::stable_sort(records, records + n, [](const Record& a, const Record& b) { return a.key < b.key; });
  }
  for (int64_t i = 0; i < n; ++i) {
    keys_out[begin + i] = keys_in[records[i].position];
    values_out[begin + i] = values_in[records[i].position];
  }
}

template <typename Key, typename Value>
void check_sort_arguments(const Key* keys_in, Key* keys_out, const Value* values_in, Value* values_out, int64_t items,
                          int begin_bit, int end_bit) {
  constexpr int kBits = static_cast<int>(sizeof(Key) * 8);
  require(items >= 0, "num_items = " + std::to_string(items) + " is negative");
  require(0 <= begin_bit && begin_bit < end_bit && end_bit <= kBits,
          "bits [" + std::to_string(begin_bit) + ", " + std::to_string(end_bit) + ") are not within a " +
              std::to_string(kBits) + "-bit key");
  require(!overlap(keys_in, keys_out, static_cast<size_t>(items) * sizeof(Key)), "d_keys_out overlaps d_keys_in");
  require(!overlap(values_in, values_out, static_cast<size_t>(items) * sizeof(Value)),
          "d_values_out overlaps d_values_in");
}

template <typename Key, typename Value>
cudaError_t radix_sort_pairs(void* d_temp_storage, size_t& temp_storage_bytes, const Key* keys_in, Key* keys_out,
                             const Value* values_in, Value* values_out, int64_t items, int begin_bit, int end_bit,
                             bool descending) {
  check_sort_arguments(keys_in, keys_out, values_in, values_out, items, begin_bit, end_bit);
  cudaError_t status;
  if (storage_protocol(d_temp_storage, temp_storage_bytes, storage_bytes(items, sizeof(Record)), status)) {
    sort_range(d_temp_storage, keys_in, keys_out, values_in, values_out, 0, items, begin_bit, end_bit, descending);
  }
  return status;
}

}  // namespace standin

struct DeviceRadixSort {
  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const Key* d_keys_in, Key* d_keys_out,
                               const Value* d_values_in, Value* d_values_out, NumItems num_items, int begin_bit = 0,
                               int end_bit = sizeof(Key) * 8, cudaStream_t = nullptr) {
    return standin::radix_sort_pairs(d_temp_storage, temp_storage_bytes, d_keys_in, d_keys_out, d_values_in,
                                     d_values_out, static_cast<int64_t>(num_items), begin_bit, end_bit, false);
  }

  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairsDescending(void* d_temp_storage, size_t& temp_storage_bytes, const Key* d_keys_in,
                                         Key* d_keys_out, const Value* d_values_in, Value* d_values_out,
                                         NumItems num_items, int begin_bit = 0, int end_bit = sizeof(Key) * 8,
                                         cudaStream_t = nullptr) {
    return standin::radix_sort_pairs(d_temp_storage, temp_storage_bytes, d_keys_in, d_keys_out, d_values_in,
                                     d_values_out, static_cast<int64_t>(num_items), begin_bit, end_bit, true);
  }
};

struct DeviceSegmentedRadixSort {
  template <typename Key, typename Value, typename BeginOffsets, typename EndOffsets>
  static cudaError_t SortPairsDescending(void* d_temp_storage, size_t& temp_storage_bytes, const Key* d_keys_in,
                                         Key* d_keys_out, const Value* d_values_in, Value* d_values_out, int num_items,
                                         int num_segments, BeginOffsets d_begin_offsets, EndOffsets d_end_offsets,
                                         int begin_bit = 0, int end_bit = sizeof(Key) * 8, cudaStream_t = nullptr) {
    standin::check_sort_arguments(d_keys_in, d_keys_out, d_values_in, d_values_out, num_items, begin_bit, end_bit);
    standin::require(num_segments >= 0, "num_segments = " + std::to_string(num_segments) + " is negative");
    cudaError_t status;
    if (!standin::storage_protocol(d_temp_storage, temp_storage_bytes,
                                   standin::storage_bytes(num_items, sizeof(standin::Record)), status)) {
      return status;
    }
    for (int s = 0; s < num_segments; ++s) {
      const int64_t begin = d_begin_offsets[s], end = d_end_offsets[s];
      if (end <= begin) continue;
      standin::require(begin >= 0 && end <= num_items, "segment " + std::to_string(s) + " = [" + std::to_string(begin) +
                                                           ", " + std::to_string(end) + ") is outside the " +
                                                           std::to_string(num_items) + " items");
      standin::sort_range(d_temp_storage, d_keys_in, d_keys_out, d_values_in, d_values_out, begin, end, begin_bit,
                          end_bit, true);
    }
    return status;
  }
};

struct DeviceScan {
  template <typename In, typename Out, typename NumItems>
  static cudaError_t ExclusiveSum(void* d_temp_storage, size_t& temp_storage_bytes, In d_in, Out d_out,
                                  NumItems num_items, cudaStream_t = nullptr) {
    using T = std::remove_cv_t<std::remove_reference_t<decltype(*d_in)>>;
    using U = std::make_unsigned_t<T>;
    constexpr int64_t kTile = 1024;  // one partial sum per tile, as the decoupled look-back keeps them
    const auto items = static_cast<int64_t>(num_items);
    standin::require(items >= 0, "num_items = " + std::to_string(items) + " is negative");
    cudaError_t status;
    if (!standin::storage_protocol(d_temp_storage, temp_storage_bytes,
                                   standin::storage_bytes((items + kTile - 1) / kTile, sizeof(U)), status)) {
      return status;
    }
    U* tile_sums = static_cast<U*>(d_temp_storage);
    const int64_t tiles = (items + kTile - 1) / kTile;
    for (int64_t t = 0; t < tiles; ++t) {
      U sum = 0;
      for (int64_t i = t * kTile; i < std::min(items, (t + 1) * kTile); ++i) sum += static_cast<U>(d_in[i]);
      tile_sums[t] = sum;
    }
    U prefix = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      U running = prefix;
      for (int64_t i = t * kTile; i < std::min(items, (t + 1) * kTile); ++i) {
        const U value = static_cast<U>(d_in[i]);  // read before the write: in place is allowed
        d_out[i] = static_cast<T>(running);
        running += value;
      }
      prefix += tile_sums[t];
    }
    return status;
  }
};

}  // namespace cub
