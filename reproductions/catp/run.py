"""``prunelab reproduce catp --preset tiny``: dispatch to the preset's module (the full preset is not built yet)."""

from prunelab.reproductions import preset_dispatch
from prunelab.reproductions.catp import tiny

add_arguments, main = preset_dispatch({"tiny": tiny})
