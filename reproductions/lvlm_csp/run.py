"""``prunelab reproduce lvlm_csp --preset tiny``: dispatch to the preset's module (the full preset is not built yet)."""

from prunelab.reproductions import preset_dispatch
from prunelab.reproductions.lvlm_csp import tiny

add_arguments, main = preset_dispatch({"tiny": tiny})
