// Registration of the bindings of each op. Every op folder defines a function that adds its
// functions to the module and registers it with DIFFCORE_REGISTER; csrc/bindings.cpp (the only
// PYBIND11_MODULE) calls them all, so ops never edit a shared file.
#pragma once
#include <pybind11/pybind11.h>

#include <tuple>
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

// A run of keyword names of the C ABI, in order. A run that several functions take (a running
// state, a tile's layout) is spelled once and joined with std::tuple_cat.
template <typename... Names>
auto keywords(const Names&... names) {
  return std::make_tuple(pybind11::arg(names)...);
}

// m.def(name, f) with the GIL released and every argument keyword-only (no swapped pointer or
// size), named in the order of `names` (a keywords(...) run or several joined), docstring `doc`.
template <typename Func, typename... Args>
void def_keyword_only(pybind11::module_& m, const char* name, Func&& f, const std::tuple<Args...>& names,
                      const char* doc) {
  std::apply(
      [&](const auto&... keyword) {
        m.def(name, std::forward<Func>(f), pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::kw_only(),
              keyword..., doc);
      },
      names);
}

}  // namespace diffcore

#define DIFFCORE_REGISTER(name, fn) static ::diffcore::RegisterOp diffcore_register_##name(#name, fn)
