// The element types of the kernels, named without torch so that the inner loops (CPU
// kernels_*.cpp, CUDA *.cu) build without torch headers.
#pragma once

#include <cstdint>

namespace worm_fast {

// Half and bfloat16 are computed in float, float in float, double in double.
enum class ScalarKind : int32_t { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

}  // namespace worm_fast
