"""``prunelab reproduce top_vim --preset tiny|full``: dispatch to the preset's module."""

from prunelab.reproductions import preset_dispatch
from prunelab.reproductions.top_vim import full, tiny

add_arguments, main = preset_dispatch({"tiny": tiny, "full": full})
