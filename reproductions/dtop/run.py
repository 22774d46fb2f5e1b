"""``prunelab reproduce dtop --preset tiny|full``: dispatch to the preset's module."""

from prunelab.reproductions import preset_dispatch
from prunelab.reproductions.dtop import full, tiny

add_arguments, main = preset_dispatch({"tiny": tiny, "full": full})
