// AVX-512 with AVX512_BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later): avx512.h's
// vectors in namespace pybn::avx512bf16, compiled with -mavx512bf16 so that float32 rounds
// to bfloat16 in one instruction (vcvtneps2bf16) instead of six; the bits are the same.
#pragma once
#define PYBN_AVX512_NAMESPACE avx512bf16
#include "pybn/vec/avx512.h"
