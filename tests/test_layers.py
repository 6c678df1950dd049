"""The package has no import cycle (the layers contract in pyproject.toml, run by `make test`, checks the order
between layers; a cycle inside one layer would slip past it)."""

from __future__ import annotations

import grimp


def test_no_import_cycle():
    graph = grimp.build_graph("longreach", cache_dir=None, exclude_type_checking_imports=True)
    cyclic = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cyclic.append((*graph.find_shortest_chain(importer=imported, imported=module), imported))
    assert not cyclic, f"import cycles: {cyclic[:3]}"
