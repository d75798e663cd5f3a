// Binds io_engine.h into kvtier._copy_engine (called from bindings.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace kvtier {
void bind_io(nanobind::module_& m);
}
