"""``prunelab reproduce lvlm_csp --preset tiny|full``: dispatch to the preset's module."""

from prunelab.reproductions import preset_dispatch
from prunelab.reproductions.lvlm_csp import full, tiny

add_arguments, main = preset_dispatch({"tiny": tiny, "full": full})
