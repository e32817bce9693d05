#pragma once
// Run-time instruction-set dispatch of the CPU backend. The kernels are compiled for every x86
// level at once (function target attributes) and picked when a session is planned, from the
// CPU's features and the DDIM_CPU_ISA override:
//
//   DDIM_CPU_ISA=portable | avx2 | avx512 | avx512_bf16 | amx     (unset or "auto": the best)
//
// An override can only narrow: naming a level this CPU (or OS) lacks is a ddim::Error that names
// the missing feature. The levels, lowest first:
//   portable     GCC vector extensions, multiply then add (any CPU)
//   avx2         AVX2 + FMA
//   avx512       AVX-512 F (+BW, VL for the packing)
//   avx512_bf16  the above + AVX512-BF16 (vdpbf16ps): enables --precision bf16
//   amx          AMX-BF16 tiles: detected and reported, no kernels yet (bf16 then runs on avx512_bf16)
// Every fp32 kernel above portable computes each output as the same chain of fused multiply-adds,
// so avx2, avx512 and avx512_bf16 give bitwise the same fp32 results; portable differs by
// rounding only (tests/cpp/test_cpu_isa.cpp states the bound).
#include <string>

namespace ddim::cpu {

enum class Isa { Portable, Avx2, Avx512, Avx512Bf16, Amx };

const char* to_string(Isa isa) noexcept;
// "portable", "avx2", "avx512", "avx512_bf16", "amx"; anything else is a ddim::Error listing them.
Isa parse_isa(const std::string& name);

// The best level this CPU and OS support (no override).
Isa detected_isa() noexcept;
// The level the CPU backend uses: the detected one, narrowed by DDIM_CPU_ISA. Throws ddim::Error
// (Unsupported) when DDIM_CPU_ISA names a level this CPU lacks, naming the missing feature, or
// (InvalidArgument) when it is not a level's name. Read on every call: sessions planned after a
// change of the variable see it.
Isa active_isa();
// Whether `isa` is usable here, and if not, the missing feature (e.g. "AVX512-BF16").
bool isa_supported(Isa isa, std::string* missing = nullptr) noexcept;

// The level that runs bf16 GEMMs at `isa` (avx512_bf16 at avx512_bf16 or amx), or throws
// ddim::Error(Unsupported) naming the missing feature.
Isa bf16_isa(Isa isa);

}  // namespace ddim::cpu
