// Runtime ISA choice: the best table the CPU (and OS) supports, or the one PYBN_ISA names.
#pragma once
#include <string>
#include <utility>
#include <vector>
#include "pybn/kernels.h"

namespace pybn {

// The active table. Chosen on first call (at import); throws std::runtime_error when
// PYBN_ISA names an unknown path or one this CPU cannot run.
const KernelTable& table();

// The active path's entry points for tests and benchmarks.
const DiagnosticTable& diagnostics();

// Switches the active table (tests run every path in one process). Throws
// std::runtime_error for an unknown name or a path this CPU cannot run.
void use_isa(const std::string& name);

// Paths this CPU can run, lowest first (always starts with "scalar").
std::vector<std::string> supported_isas();

// Every path in the build, lowest first, with the CPU features it needs (space-separated).
std::vector<std::pair<std::string, std::string>> compiled_isas();

}  // namespace pybn
