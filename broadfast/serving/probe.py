"""The probe pairs every new version is checked on before it serves (and that int8 backends are
calibrated and checked with)."""

from __future__ import annotations

# Fixed probe pairs (query, ad text): a spread of exact, partial and irrelevant matches.
PROBE_PAIRS: tuple[tuple[str, str], ...] = (
    ("cordless drill", "20V MAX cordless drill driver kit with two batteries"),
    ("cordless drill", "Garden hose 50 ft heavy duty"),
    ("cordless drill", "Drill bit set titanium 29 piece"),
    ("led light bulb", "60-Watt equivalent A19 dimmable LED light bulb soft white"),
    ("led light bulb", "Ceiling fan with light kit 52 in."),
    ("led light bulb", "Porch paint gloss white 1 gal."),
    ("paint roller", "9 in. x 3/8 in. paint roller cover 3 pack"),
    ("paint roller", "Paint tray liner plastic"),
    ("paint roller", "Lawn mower blade 21 in."),
    ("toilet seat", "Round closed front toilet seat in white"),
    ("toilet seat", "Toilet flapper 2 in. universal"),
    ("toilet seat", "Outdoor wall lantern black"),
    ("pvc pipe 2 inch", "2 in. x 10 ft. PVC schedule 40 plain end pipe"),
    ("pvc pipe 2 inch", "PVC cement and primer combo pack"),
    ("pvc pipe 2 inch", "Ceramic floor tile 12 in. x 12 in."),
    ("wood screws", "#8 x 1-1/4 in. phillips flat head wood screws 1 lb box"),
    ("wood screws", "Drywall anchors with screws kit"),
    ("wood screws", "Refrigerator water filter"),
    ("smoke detector", "Battery operated smoke alarm with 10 year battery"),
    ("smoke detector", "Carbon monoxide and smoke combination alarm"),
    ("smoke detector", "Vinyl plank flooring gray oak"),
    ("kitchen faucet", "Single-handle pull-down sprayer kitchen faucet in stainless steel"),
    ("kitchen faucet", "Bathroom sink faucet chrome 4 in. centerset"),
    ("kitchen faucet", "Extension ladder 24 ft aluminum"),
)
