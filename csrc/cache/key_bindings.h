// Binds key_bindings.cpp into kvtier._copy_engine (bindings.cpp; only when
// OpenSSL's libcrypto was found: KVTIER_WITH_KEYS).
#pragma once

#include <nanobind/nanobind.h>

namespace kvtier {
void bind_keys(nanobind::module_& m);
}
