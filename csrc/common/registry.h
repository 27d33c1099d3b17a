// Registration of the bindings of each op. Every op folder defines a function that adds its
// functions to the module and registers it with DIFFCORE_REGISTER; csrc/bindings.cpp (the only
// PYBIND11_MODULE) calls them all, so ops never edit a shared file.
#pragma once
#include <pybind11/pybind11.h>

#include <utility>
#include <vector>

namespace diffcore {

using Registrar = void (*)(pybind11::module_&);

inline std::vector<std::pair<const char*, Registrar>>& registry() {
  static std::vector<std::pair<const char*, Registrar>> entries;
  return entries;
}

struct RegisterOp {
  RegisterOp(const char* name, Registrar fn) { registry().emplace_back(name, fn); }
};

}  // namespace diffcore

#define DIFFCORE_REGISTER(name, fn) static ::diffcore::RegisterOp diffcore_register_##name(#name, fn)
