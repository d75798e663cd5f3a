// Binds key_bindings.cpp into kvtier._copy_engine (bindings.cpp; only when
// libb2 was found: KVTIER_WITH_B2).
#pragma once

#include <nanobind/nanobind.h>

namespace kvtier {
void bind_keys(nanobind::module_& m);
}
