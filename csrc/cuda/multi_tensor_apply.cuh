// Multi-tensor apply: one kernel launch covers many tensors.
//
// The host walks the tensors, cuts each into chunks of `chunk_size` elements and packs,
// per launch, the addresses of up to max_tensors<kDepth>() tensors and kMaxBlocks
// (tensor, chunk) pairs into a struct passed by value as the kernel argument (under the
// 4 KiB argument limit). Block b of the launch processes chunk block_to_chunk[b] of tensor slot
// block_to_tensor[b]. A launch goes out when the blocks or the tensor slots are full;
// a tensor whose chunks straddle two launches keeps going in slot 0 of the next one.
// Nothing is synchronized with the host.
#pragma once

#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <vector>

namespace worm_fast::cuda {

constexpr int kMaxBlocks = 320;  // per launch
// Bytes of TensorListMeta at most, leaving room under the 4 KiB kernel-argument limit
// for the kernel's other arguments.
constexpr int kMetaBytes = 3584;

// Tensor slots per launch with kDepth addresses per tensor: 36 (as apex) where they fit,
// fewer for deeper lists (31 for the 7 addresses of AdamW).
template <int kDepth>
constexpr int max_tensors() {
  constexpr int fit = (kMetaBytes - kMaxBlocks * (1 + 4)) / (8 * (kDepth + 1));
  return fit < 36 ? fit : 36;
}

constexpr int kMaxTensors = max_tensors<4>();  // the SGD step's 4 addresses

template <int kDepth>
struct TensorListMeta {
  static constexpr int kTensors = max_tensors<kDepth>();
  void* ptr[kDepth][kTensors];
  int64_t numel[kTensors];
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

static_assert(kMaxTensors == 36, "the SGD step keeps apex's 36 tensors per launch");
static_assert(sizeof(TensorListMeta<4>) <= kMetaBytes, "kernel arguments must stay under 4 KiB");
static_assert(sizeof(TensorListMeta<7>) <= kMetaBytes, "kernel arguments must stay under 4 KiB");
static_assert(max_tensors<1>() <= 255, "block_to_tensor is a uint8_t");

// `addresses[t]` holds the kDepth pointers of tensor t (null where a tensor has none of
// that kind, e.g. no mask); `launch(meta, blocks)` launches the kernel over `blocks`.
template <int kDepth, typename Launch>
void multi_tensor_apply(int64_t chunk_size, const std::vector<std::array<void*, kDepth>>& addresses,
                        const std::vector<int64_t>& numels, const Launch& launch) {
  TORCH_INTERNAL_ASSERT(addresses.size() == numels.size());
  std::vector<size_t> order;  // the tensors with elements
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] > 0) {
      order.push_back(t);
    }
  }
  constexpr int kTensors = TensorListMeta<kDepth>::kTensors;
  TensorListMeta<kDepth> meta{};
  int tensors = 0;
  int blocks = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const size_t t = order[k];
    int slot = tensors++;
    for (int d = 0; d < kDepth; ++d) {
      meta.ptr[d][slot] = addresses[t][d];
    }
    meta.numel[slot] = numels[t];
    const int64_t chunks = (numels[t] + chunk_size - 1) / chunk_size;
    TORCH_CHECK(chunks <= INT32_MAX, "worm_fast: tensor too large for the chunk index");
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool blocks_full = blocks == kMaxBlocks;
      const bool tensors_full = tensors == kTensors && last_chunk;
      const bool last = last_chunk && k + 1 == order.size();
      if (blocks_full || tensors_full || last) {
        launch(meta, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the rest of this tensor continues in slot 0
          for (int d = 0; d < kDepth; ++d) {
            meta.ptr[d][0] = meta.ptr[d][slot];
          }
          meta.numel[0] = meta.numel[slot];
          slot = 0;
          tensors = 1;
        }
      }
    }
  }
}

}  // namespace worm_fast::cuda
