// Element type codes shared by the launchers and their Python callers (torchext._C.FLOAT32, BFLOAT16, FLOAT16).
#pragma once

#include <cstdint>

namespace torchext {

enum DtypeCode : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace torchext
