"""Target plugins: one module per codebase that ReGATE patches (installed as ``regate_plugin.patches``).

Each module is a plain pluggy plugin registered under the ``regate`` entry-point group; it knows how
to patch one codebase and nothing about the scoring math, which lives in ``regate_plugin``.
"""
