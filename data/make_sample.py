"""Generate fusionrec's shipped sample data set (items, users, interactions, media).

Everything here is the project's own work: the text comes from the templates and
vocabularies below, the pictures are drawn with PIL and the sounds are synthesised
with numpy. Eight themes are each consistent across text, image and audio so that a
recommendation list can be checked by eye; `themes.json` holds the ground truth.

Run `.venv/bin/python data/make_sample.py` from the project root: it rewrites the
files next to this script, byte for byte the same each time for the same seed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import soundfile as sf
from PIL import Image, ImageDraw, ImageFilter

SEED = 20240701
N_ITEMS = 200
N_USERS = 120
N_COLD_USERS = 3
SAMPLE_RATE = 16_000
# Interactions cover the 90 days that end at this fixed instant (2024-07-01T00:00:00Z).
END_TS = 1_719_792_000
DAYS = 90
# Share of items without a modality (each drawn independently).
MISSING_SHARE = {"image": 0.04, "audio": 0.04, "description": 0.03}
IMAGE_SIZES = (128, 144, 160)
# Image containers (extension, PIL format, share); JPEG dominates as in real catalogues.
IMAGE_FORMATS = (("jpg", "JPEG", 0.86), ("png", "PNG", 0.07), ("webp", "WEBP", 0.07))
# Audio containers: FLAC is lossless; OGG Vorbis is ~3x smaller for the noisy themes.
AUDIO_FORMATS = (("flac", "FLAC", "PCM_16", 0.6), ("ogg", "OGG", "VORBIS", 0.4))
EVENTS = ("view", "click", "cart", "purchase")


@dataclass(frozen=True)
class Theme:
    """Vocabulary and descriptions of one theme (text, image and audio style)."""

    label: str
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    places: tuple[str, ...]
    sounds: tuple[str, ...]
    colors: tuple[str, ...]
    sentences: tuple[str, ...]
    tags: tuple[str, ...]
    likes: tuple[str, ...]  # phrases users write about this theme
    brand: str
    image_style: str
    audio_style: str


THEMES: dict[str, Theme] = {
    "ocean": Theme(
        label="Ocean",
        adjectives=("Tidal", "Saltwater", "Coastal", "Briny", "Azure", "Seafoam", "Deep-Water",
                    "Windward", "Pelagic", "Low-Tide"),
        nouns=("Swell", "Breakers", "Lagoon", "Shoreline", "Reef", "Current", "Tide Pool",
               "Harbour", "Surf", "Estuary", "Lighthouse", "Cove", "Seawall"),
        places=("a rocky cove", "an empty beach at dawn", "the end of a wooden pier",
                "a harbour wall", "a lighthouse point", "the open sea", "a sheltered lagoon"),
        sounds=("slow rolling waves", "the hiss of surf on shingle", "a deep tidal hum",
                "foam drawing back over pebbles", "a long low swell"),
        colors=("deep blue", "teal", "turquoise", "slate blue", "seafoam white"),
        sentences=(
            "Waves roll in over {place} while {sound} fills the room.",
            "A {color} study of the tide, painted in long curling lines of foam.",
            "Salt spray, low swell and {sound}: the sea at its most patient.",
            "Imagined at {place}, it rises and falls like slow breathing.",
            "Curling breakers drawn in {color} beneath a pale sky.",
            "The undertow pulls everything back toward the horizon.",
            "A boat rocks at anchor, its rope creaking against the hull.",
            "A low drone like the sea heard inside a shell.",
        ),
        tags=("ocean", "sea", "waves", "coastal", "beach", "tide", "water", "nautical"),
        likes=("the sound of waves", "calm coastal mornings", "beaches, tides and sea spray",
               "sailing and harbour life", "deep blue water"),
        brand="Tidewater Audio",
        image_style="blue sky over a deep-blue sea crossed by light curling wave lines",
        audio_style="low sine drone (55-82 Hz) swelling slowly, with band-limited surf noise",
    ),
    "forest": Theme(
        label="Forest",
        adjectives=("Mossy", "Evergreen", "Pine", "Fern", "Woodland", "Verdant", "Leafy",
                    "Cedar", "Shaded", "Greenwood"),
        nouns=("Canopy", "Grove", "Thicket", "Clearing", "Pinewood", "Glade", "Understory",
               "Trail", "Birchwood", "Timberline", "Copse", "Fernbrake"),
        places=("a pine grove after rain", "a mossy clearing", "a narrow deer trail",
                "the edge of an old oak wood", "a fern-covered valley", "a woodland stream"),
        sounds=("birdsong overhead", "wind moving through branches", "a woodpecker far off",
                "leaves rustling underfoot", "a thrush calling at dusk"),
        colors=("moss green", "emerald", "deep pine green", "olive", "bark brown"),
        sentences=(
            "Tall conifers stand as stacked {color} triangles over a soft green haze.",
            "{sound} drifts down through the canopy.",
            "A quiet walk through {place}, with {sound}.",
            "Sunlight breaks through the leaves in narrow shafts.",
            "It smells of damp earth, bark and pine needles.",
            "Every trunk leans a little toward the light.",
            "Small birds chirp and flit between the branches.",
            "Made for hikers, campers and anyone who misses the woods.",
        ),
        tags=("forest", "woods", "trees", "nature", "birdsong", "green", "hiking", "pine"),
        likes=("walks in the woods", "birdsong and tall pines", "green, leafy places",
               "camping under the trees", "moss, ferns and forest trails"),
        brand="Mossbank Studio",
        image_style="green sky-to-ground gradient with rows of dark green triangle trees",
        audio_style="soft wind noise with short high chirps sweeping 2.5-4.5 kHz (birds)",
    ),
    "fire": Theme(
        label="Fire",
        adjectives=("Ember", "Smouldering", "Blazing", "Crackling", "Glowing", "Ashen",
                    "Kindled", "Flickering", "Molten", "Firelit"),
        nouns=("Hearth", "Bonfire", "Campfire", "Embers", "Flame", "Blaze", "Kindling",
               "Furnace", "Fireside", "Sparks", "Woodstove", "Torch"),
        places=("a stone hearth", "a beach bonfire", "a cast-iron woodstove",
                "a campfire under the pines", "a blacksmith's forge", "a courtyard brazier"),
        sounds=("crackling logs", "sparks popping", "the roar of a draught through the grate",
                "embers settling and hissing", "dry kindling snapping"),
        colors=("red-orange", "deep crimson", "amber", "golden yellow", "charcoal black"),
        sentences=(
            "Flames lick upward in {color} tongues over a dark bed of coals.",
            "{sound} and a steady warmth, like sitting beside {place}.",
            "Dry wood catches, pops and settles into glowing embers.",
            "A heat-haze painting of fire, all orange, red and smoke.",
            "The crackle comes in short bursts, never quite the same twice.",
            "For a cold evening when you want the feeling of a real fire.",
            "Smoke curls away while the logs shift and spit sparks.",
        ),
        tags=("fire", "fireplace", "flames", "campfire", "warm", "cozy", "crackle", "embers"),
        likes=("a crackling fireplace", "campfires and warm embers",
               "cozy evenings by the hearth", "the glow of flames", "bonfire nights"),
        brand="Emberline",
        image_style="black-to-dark-red gradient with layered red, orange and yellow flames",
        audio_style="brown-noise rumble under dense random noise bursts (crackle)",
    ),
    "city_night": Theme(
        label="City night",
        adjectives=("Neon", "Midnight", "Downtown", "Rain-Slick", "Electric", "Late-Night",
                    "Rooftop", "Streetlit", "Sodium", "After-Hours"),
        nouns=("Skyline", "Boulevard", "Overpass", "Alleyway", "Underpass", "Night Bus",
               "Tower Block", "Intersection", "Subway", "Avenue", "Metro", "Parking Deck"),
        places=("a rooftop above the avenue", "a rain-soaked crossing", "the last night bus",
                "an all-night diner window", "an empty parking deck", "a tower block balcony"),
        sounds=("a pulsing synth bassline", "tyres hissing on wet asphalt", "distant sirens",
                "a ticking hi-hat", "the hum of streetlights"),
        colors=("neon magenta", "electric blue", "sodium yellow", "midnight navy", "violet"),
        sentences=(
            "Tower blocks stand in silhouette, their windows lit {color} against the dark.",
            "A driving pulse for {place}, with {sound} underneath.",
            "Traffic lights change for nobody at three in the morning.",
            "The city never sleeps; it just turns the lights down.",
            "Glass, concrete and neon reflected in puddles.",
            "A steady eighth-note rhythm like headlights passing one after another.",
            "For night drives, late shifts and walking home through downtown.",
        ),
        tags=("city", "night", "urban", "neon", "nightlife", "synth", "downtown", "skyline"),
        likes=("neon and city lights", "late-night drives downtown",
               "urban nightlife and synth beats", "rainy streets after midnight",
               "skyline views at night"),
        brand="Neon Alley Works",
        image_style="navy-to-purple sky, black tower blocks with lit yellow/cyan windows",
        audio_style="square-wave bass pulses in eighths (110-128 bpm) with off-beat hi-hats",
    ),
    "desert": Theme(
        label="Desert",
        adjectives=("Sunbaked", "Sandstone", "Arid", "Dusty", "Ochre", "Windswept", "Golden",
                    "Parched", "Canyon", "Red-Rock"),
        nouns=("Dunes", "Oasis", "Mesa", "Caravan", "Mirage", "Canyon", "Sand Sea", "Dry Wash",
               "Salt Flat", "Badlands", "Sirocco", "Erg"),
        places=("the crest of a tall dune", "a dry riverbed", "an oasis at noon",
                "a red sandstone canyon", "a salt flat at sunset", "a camel track across the erg"),
        sounds=("wind combing the sand", "a lone reed flute", "sand hissing over the ridge",
                "a slow modal melody", "heat shimmer and silence"),
        colors=("ochre", "sand gold", "burnt sienna", "pale apricot", "rust red"),
        sentences=(
            "Rolling dunes under a huge {color} sun.",
            "{sound} crosses {place} and fades again.",
            "Heat shimmers over the sand until the horizon melts.",
            "A sparse, dry landscape where a single cactus keeps watch.",
            "Long notes in an old modal scale, carried on a warm wind.",
            "Caravans, mirages and the slow patience of the dunes.",
            "Dust, stone and sky in a palette of {color} and pale blue.",
        ),
        tags=("desert", "dunes", "sand", "arid", "wind", "canyon", "sunset", "oasis"),
        likes=("wide open deserts", "dunes and sunsets", "dry canyon landscapes",
               "the silence of the sand", "caravans and oasis stories"),
        brand="Dune & Drift",
        image_style="pale sky over layered ochre/sand dunes under a large orange sun",
        audio_style="slowly swelling wind noise with long reed-like notes in a modal scale",
    ),
    "snow": Theme(
        label="Snow",
        adjectives=("Frosted", "Glacial", "Snowbound", "Wintry", "Powder", "Icy", "Hushed",
                    "Crystal", "Alpine", "Polar"),
        nouns=("Snowfall", "Drift", "Glacier", "Icicle", "Blizzard", "Summit", "Tundra",
               "Frost", "Snowfield", "Ice Shelf", "Sleigh Track", "Flurry"),
        places=("an alpine hut", "a frozen lake", "a silent snowfield",
                "a ridge under fresh powder", "a mountain pass in January",
                "a village street after the storm"),
        sounds=("soft bell tones", "boots squeaking in fresh snow", "ice crystals chiming",
                "a muffled hush", "sleigh bells far away"),
        colors=("ice white", "pale silver-blue", "frost grey", "glacier blue", "pearl"),
        sentences=(
            "Snowflakes drift over grey-blue peaks, the whole scene in {color}.",
            "{sound} in the cold clear air above {place}.",
            "Everything is muffled under a thick layer of new snow.",
            "Sparse, glassy chimes like frost forming on a window.",
            "Breath turns to mist; the world is white and still.",
            "For winter mornings, hot drinks and quiet reading.",
            "Icicles hang from the eaves and catch the low sun.",
        ),
        tags=("snow", "winter", "ice", "cold", "frost", "alpine", "mountains", "chimes"),
        likes=("fresh snow and winter quiet", "frosty alpine mornings", "icy mountain peaks",
               "snowfall outside the window", "the chime of cold air"),
        brand="Hushfall Sound",
        image_style="pale grey-blue sky, snow-capped grey-blue mountains, white flakes",
        audio_style="sparse high bell strikes (1-2.6 kHz, inharmonic partials) over faint hiss",
    ),
    "jazz_club": Theme(
        label="Jazz club",
        adjectives=("Smoky", "Velvet", "Swinging", "Bluesy", "Mellow", "Backroom", "Brass",
                    "Cool", "Syncopated", "Lounge"),
        nouns=("Standard", "Quartet", "Speakeasy", "Bandstand", "Ballad", "Jam Session",
               "Back Room", "Ivory Keys", "Nightcap", "Groove", "Trio", "Encore"),
        places=("a basement club downtown", "a candlelit corner table",
                "the bandstand after midnight", "a velvet booth by the piano",
                "a smoky back room", "an old speakeasy bar"),
        sounds=("swung seventh chords on an electric piano", "a walking upright bass",
                "brushes on the snare", "a muted trumpet line", "a soft piano comp"),
        colors=("whiskey amber", "burgundy", "brass gold", "warm brown", "deep wine red"),
        sentences=(
            "A warm {color} spotlight falls on the stage and the piano keys.",
            "{sound} with a lazy swing, as if heard from {place}.",
            "Seventh chords, syncopation and a bassline that keeps walking.",
            "Glasses clink, the drummer switches to brushes, the room leans in.",
            "Rich harmony and a relaxed tempo for late evenings.",
            "A trio plays standards while the rain comes down outside.",
            "The painting glows in amber and red like a lamp-lit bar.",
        ),
        tags=("jazz", "club", "lounge", "piano", "swing", "bass", "live", "chords"),
        likes=("smoky jazz clubs", "piano trios and walking bass",
               "swing and late-night standards", "lounge music with a glass of wine",
               "brushes, brass and seventh chords"),
        brand="Seventh Room Records",
        image_style="burgundy/brown room, amber spotlight and bokeh lights, piano keyboard",
        audio_style="swung seventh-chord stabs (ii-V-I), walking sine bass, brush swishes",
    ),
    "space": Theme(
        label="Space",
        adjectives=("Cosmic", "Orbital", "Stellar", "Nebular", "Interstellar", "Lunar",
                    "Galactic", "Zero-G", "Celestial", "Starlit"),
        nouns=("Nebula", "Orbit", "Starfield", "Comet", "Satellite", "Eclipse", "Supernova",
               "Event Horizon", "Moonbase", "Pulsar", "Galaxy", "Launch Window"),
        places=("a station orbiting a ringed planet", "the far side of the moon",
                "a deep-space probe", "the edge of a spiral galaxy",
                "an observatory dome at night", "a cockpit drifting between stars"),
        sounds=("sparkling arpeggios", "a deep sub-bass drone", "radio static from far away",
                "slow shimmering synth pads", "the pulse of a distant star"),
        colors=("deep violet", "cosmic black", "nebula pink", "starlight white", "ultramarine"),
        sentences=(
            "Ringed planets hang in a black sky scattered with stars and {color} nebulae.",
            "{sound} for {place}.",
            "Weightless, cold and vast: the silence between galaxies.",
            "Fast glittering arpeggios circle like satellites.",
            "A tribute to astronauts, telescopes and long orbits.",
            "Comets streak across a field of pinprick stars.",
            "For sci-fi reading, stargazing and deep focus.",
        ),
        tags=("space", "cosmic", "stars", "planets", "sci-fi", "galaxy", "astronomy", "synth"),
        likes=("space and the stars", "sci-fi soundtracks", "planets, nebulae and galaxies",
               "stargazing on clear nights", "cosmic synth arpeggios"),
        brand="Orbit Loom",
        image_style="black sky with violet/pink nebula glow, white stars, ringed planets",
        audio_style="fast echoing sine arpeggios (392-1570 Hz) over a gliding 40 Hz sub drone",
    ),
}
THEME_NAMES = tuple(THEMES)
GENERAL_BRANDS = ("Quiet Hour Co.", "Fieldnote Labs")
GENERIC_SENTENCES = (
    "Includes a short seamless loop and a matching square artwork.",
    "Works well as background for focus, study or sleep.",
    "Part of the {brand} catalogue.",
    "Mastered quietly so it sits under conversation.",
    "Licensed for personal and streaming use.",
    "Comes with a printable version of the artwork.",
)
GENERIC_TAGS = ("ambient", "loop", "relax", "focus", "sleep", "study", "background",
                "soundscape", "artwork", "mood")
TITLE_PATTERNS = ("{adj} {noun}", "{adj} {noun}", "{noun} of the {adj2} Hours",
                  "{adj} {noun} No. {n}", "{noun} Study", "The {adj} {noun}",
                  "{noun} at {time}", "{adj} {noun} ({form})")
TIMES = ("Dawn", "Dusk", "Midnight", "Noon", "First Light", "Low Sun")
FORMS = ("Loop", "Suite", "Sketch", "Edit", "Print", "Pack")
LIKE_PATTERNS_ONE = (
    "I'm into {a}. Recommend me more like that.",
    "Big fan of {a} and {b}.",
    "Looking for {a} for my evenings; {b} is even better.",
    "Mostly put on {a} while I work.",
    "Anything with {a}, please.",
)
LIKE_PATTERNS_TWO = (
    "I like {a} but also {c}.",
    "{A} or {c}: those are my two moods.",
    "Half {a}, half {c}, anything in between works too.",
    "Into {a}, {b} and lately {c}.",
)


# ----------------------------------------------------------------------------- helpers

def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes via a temporary file in the same directory (pipeline.storage not yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pick(rng: np.random.Generator, seq: tuple[str, ...] | list[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _ogg_crc(data: bytes) -> int:
    """Ogg's page checksum: CRC-32, polynomial 0x04C11DB7, no reflection, no final xor."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_TABLE[((crc >> 24) ^ byte) & 0xFF]
    return crc


def _ogg_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_TABLE = _ogg_table()


def _fix_ogg_serial(data: bytes, serial: int) -> bytes:
    """Replace the stream serial of every Ogg page, which libsndfile draws at random."""
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos:pos + 4] != b"OggS":
            raise ValueError(f"not an Ogg page at byte {pos}")
        n_seg = out[pos + 26]
        length = 27 + n_seg + sum(out[pos + 27:pos + 27 + n_seg])
        out[pos + 14:pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22:pos + 26] = b"\0\0\0\0"
        out[pos + 22:pos + 26] = _ogg_crc(bytes(out[pos:pos + length])).to_bytes(4, "little")
        pos += length
    return bytes(out)


# ----------------------------------------------------------------------------- text

def _title(rng: np.random.Generator, th: Theme) -> str:
    return _pick(rng, TITLE_PATTERNS).format(
        adj=_pick(rng, th.adjectives), adj2=_pick(rng, th.adjectives),
        noun=_pick(rng, th.nouns), n=int(rng.integers(1, 10)),
        time=_pick(rng, TIMES), form=_pick(rng, FORMS))


def _fill(rng: np.random.Generator, template: str, th: Theme, brand: str) -> str:
    s = template.format(place=_pick(rng, th.places), sound=_pick(rng, th.sounds),
                        color=_pick(rng, th.colors), brand=brand)
    return _cap(s)


def _description(rng: np.random.Generator, th: Theme, brand: str) -> str:
    k = int(rng.integers(2, 4))
    idx = rng.choice(len(th.sentences), size=k, replace=False)
    parts = [_fill(rng, th.sentences[i], th, brand) for i in idx]
    if rng.random() < 0.6:  # generic catalogue prose blurs the themes a little
        parts.insert(int(rng.integers(len(parts) + 1)), _fill(rng, _pick(rng, GENERIC_SENTENCES),
                                                               th, brand))
    return " ".join(parts)


def _tags(rng: np.random.Generator, th: Theme) -> str:
    own = rng.choice(len(th.tags), size=int(rng.integers(2, 5)), replace=False)
    generic = rng.choice(len(GENERIC_TAGS), size=int(rng.integers(0, 3)), replace=False)
    return "|".join([th.tags[i] for i in sorted(own)] + [GENERIC_TAGS[i] for i in sorted(generic)])


def _profile(rng: np.random.Generator, favs: list[str]) -> str:
    a, b = (THEMES[favs[0]].likes[i] for i in rng.choice(5, size=2, replace=False))
    if len(favs) == 1:
        return _pick(rng, LIKE_PATTERNS_ONE).format(a=a, b=b)
    c = _pick(rng, THEMES[favs[1]].likes)
    return _pick(rng, LIKE_PATTERNS_TWO).format(a=a, A=_cap(a), b=b, c=c)


# ----------------------------------------------------------------------------- images

def _gradient(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int],
              y0: int = 0, y1: int | None = None) -> np.ndarray:
    """Vertical gradient (size, size, 3) float between two colours over rows y0..y1."""
    y1 = size if y1 is None else y1
    w = np.clip((np.arange(size) - y0) / max(y1 - y0 - 1, 1), 0.0, 1.0)[:, None, None]
    row = (1 - w) * np.asarray(top, float) + w * np.asarray(bottom, float)
    return np.broadcast_to(row, (size, size, 3)).copy()


def _jit(rng: np.random.Generator, color: tuple[int, int, int], amount: int = 18) -> tuple:
    c = np.clip(np.asarray(color) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return tuple(int(v) for v in c)


def _blob(size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))[..., None]


def _img_ocean(rng: np.random.Generator, s: int) -> Image.Image:
    horizon = int(s * rng.uniform(0.25, 0.4))
    arr = _gradient(s, _jit(rng, (150, 200, 235)), _jit(rng, (205, 228, 245)), 0, horizon)
    arr[horizon:] = _gradient(s, _jit(rng, (30, 120, 170)), _jit(rng, (8, 30, 90)),
                              horizon, s)[horizon:]
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    xs = np.arange(0, s + 4, 3)
    for y0 in np.sort(rng.uniform(horizon + 6, s - 4, int(rng.integers(5, 9)))):
        amp, lam, ph = rng.uniform(2, 6), rng.uniform(s / 4, s / 1.5), rng.uniform(0, 2 * np.pi)
        ys = y0 + amp * np.sin(2 * np.pi * xs / lam + ph)
        color = _jit(rng, (120, 190, 230) if rng.random() < 0.6 else (225, 240, 250), 15)
        d.line(list(zip(xs.tolist(), ys.tolist())), fill=color, width=int(rng.integers(2, 4)))
    return img


def _img_forest(rng: np.random.Generator, s: int) -> Image.Image:
    ground = int(s * rng.uniform(0.7, 0.82))
    arr = _gradient(s, _jit(rng, (190, 220, 170)), _jit(rng, (110, 160, 90)), 0, ground)
    soil = _gradient(s, _jit(rng, (60, 90, 40)), _jit(rng, (35, 55, 25)), ground, s)
    arr[ground:] = soil[ground:]
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for x in np.sort(rng.uniform(-5, s + 5, int(rng.integers(6, 11)))):
        h, w = rng.uniform(0.35, 0.65) * s, rng.uniform(0.12, 0.22) * s
        base = ground + rng.uniform(-4, 6)
        d.rectangle([x - w * 0.08, base - h * 0.15, x + w * 0.08, base],
                    fill=_jit(rng, (90, 60, 30)))
        green = _jit(rng, (30, 100, 45), 25)
        for k in range(3):  # stacked triangles make a conifer
            top = base - h + k * h * 0.22
            bot = base - h * 0.15 - (2 - k) * h * 0.2
            half = w * (0.5 + 0.25 * k) / 1.5
            d.polygon([(x, top), (x - half, bot), (x + half, bot)], fill=green)
    return img


def _img_fire(rng: np.random.Generator, s: int) -> Image.Image:
    img = Image.fromarray(_gradient(s, _jit(rng, (15, 5, 5), 10),
                                    _jit(rng, (110, 20, 10), 20)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    base = s * rng.uniform(0.85, 0.93)
    layers = ((_jit(rng, (200, 40, 15)), 1.0), (_jit(rng, (245, 120, 20)), 0.7),
              (_jit(rng, (255, 215, 80)), 0.4))
    theta = np.linspace(0, 2 * np.pi, 48)
    for cx in np.sort(rng.uniform(0.2 * s, 0.8 * s, int(rng.integers(3, 6)))):
        h, w = rng.uniform(0.4, 0.75) * s, rng.uniform(0.2, 0.35) * s
        lean, wobble = rng.uniform(-0.2, 0.2), rng.uniform(0, 6.3)
        for color, scale in layers:
            # Teardrop with its tip up, bent sideways toward the tip like a flickering flame.
            up = (1 + np.cos(theta)) / 2
            xs = cx + w / 2 * scale * (np.sin(theta) * np.sin(theta / 2) ** 3
                                       + (lean + 0.08 * np.sin(3 * np.pi * up + wobble)) * up)
            ys = base - h * scale * up
            d.polygon(list(zip(xs.tolist(), ys.tolist())), fill=color)
    for _ in range(2):  # logs
        y = base + rng.uniform(-2, 6)
        d.line([(0.2 * s, y + rng.uniform(-5, 5)), (0.8 * s, y + rng.uniform(-5, 5))],
               fill=_jit(rng, (60, 30, 15)), width=int(s * 0.05))
    return img


def _img_city(rng: np.random.Generator, s: int) -> Image.Image:
    sky = _gradient(s, _jit(rng, (15, 15, 50)), _jit(rng, (70, 30, 90)))
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        mx, my, mr = rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.25) * s, s * 0.06
        d.ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=_jit(rng, (235, 235, 210), 10))
    x = -rng.uniform(0, 10)
    while x < s:
        w = rng.uniform(0.1, 0.2) * s
        top = rng.uniform(0.2, 0.6) * s
        d.rectangle([x, top, x + w, s], fill=_jit(rng, (12, 12, 22), 8))
        lit = _jit(rng, (250, 210, 90), 20) if rng.random() < 0.7 else _jit(rng, (90, 230, 250), 20)
        for wy in np.arange(top + 4, s - 4, 7):
            for wx in np.arange(x + 3, x + w - 4, 6):
                if rng.random() < 0.4:
                    d.rectangle([wx, wy, wx + 2, wy + 3], fill=lit)
        x += w + rng.uniform(1, 5)
    y = s * rng.uniform(0.9, 0.97)
    d.line([(0, y), (s, y)], fill=_jit(rng, (255, 40, 200), 20), width=2)  # neon strip
    return img


def _img_desert(rng: np.random.Generator, s: int) -> Image.Image:
    arr = _gradient(s, _jit(rng, (140, 190, 230)), _jit(rng, (250, 205, 160)), 0, int(0.6 * s))
    arr += 150 * _blob(s, rng.uniform(0.2, 0.8) * s, rng.uniform(0.2, 0.4) * s, 0.12 * s) \
        * (np.array([1.0, 0.55, 0.1]) - arr / 255 * 0.5)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    sx, sy = rng.uniform(0.25, 0.75) * s, rng.uniform(0.2, 0.35) * s
    sr = rng.uniform(0.08, 0.13) * s
    d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=_jit(rng, (250, 160, 50), 12))
    xs = np.arange(0, s + 4, 3)
    shades = ((235, 195, 120), (215, 160, 85), (190, 125, 60), (160, 95, 45))
    for k, y0 in enumerate(np.sort(rng.uniform(0.45, 0.8, int(rng.integers(3, 5))) * s)):
        ys = y0 + rng.uniform(3, 9) * np.sin(2 * np.pi * xs / rng.uniform(s / 2, s * 1.2)
                                             + rng.uniform(0, 6.3))
        d.polygon(list(zip(xs.tolist(), ys.tolist())) + [(s, s), (0, s)], fill=_jit(rng, shades[k]))
    if rng.random() < 0.35:  # a cactus
        cx, cy = rng.uniform(0.15, 0.85) * s, s * 0.92
        d.rectangle([cx - 2, cy - 0.25 * s, cx + 2, cy], fill=(50, 110, 50))
        d.rectangle([cx - 8, cy - 0.17 * s, cx - 6, cy - 0.09 * s], fill=(50, 110, 50))
        d.rectangle([cx - 8, cy - 0.1 * s, cx, cy - 0.08 * s], fill=(50, 110, 50))
    return img


def _img_snow(rng: np.random.Generator, s: int) -> Image.Image:
    img = Image.fromarray(_gradient(s, _jit(rng, (200, 212, 228), 10),
                                    _jit(rng, (240, 244, 250), 6)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4))):
        px, h, w = rng.uniform(0, s), rng.uniform(0.3, 0.55) * s, rng.uniform(0.35, 0.6) * s
        base = s * 0.8
        d.polygon([(px, base - h), (px - w / 2, base), (px + w / 2, base)],
                  fill=_jit(rng, (120, 140, 170), 15))
        cap = base - h * 0.68
        d.polygon([(px, base - h), (px - w * 0.16, cap), (px + w * 0.16, cap)],
                  fill=_jit(rng, (245, 248, 252), 5))
    d.rectangle([0, s * 0.8, s, s], fill=_jit(rng, (238, 242, 248), 6))
    for x, y, r in zip(rng.uniform(0, s, 70), rng.uniform(0, s, 70), rng.uniform(0.6, 2.0, 70)):
        d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    return img


def _img_jazz(rng: np.random.Generator, s: int) -> Image.Image:
    arr = _gradient(s, _jit(rng, (70, 15, 25)), _jit(rng, (35, 18, 12)))
    arr += _blob(s, rng.uniform(0.3, 0.7) * s, rng.uniform(0.2, 0.45) * s, 0.22 * s) \
        * np.array(_jit(rng, (200, 140, 50)), float)
    for _ in range(int(rng.integers(4, 9))):  # bokeh lamps
        arr += 0.8 * _blob(s, rng.uniform(0, s), rng.uniform(0, 0.5 * s), rng.uniform(2, 5)) \
            * np.array(_jit(rng, (255, 180, 80)), float)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    top, kw = s * rng.uniform(0.72, 0.8), s / rng.integers(12, 17)
    d.rectangle([0, top, s, s], fill=_jit(rng, (235, 225, 205), 8))
    for k in range(int(s / kw) + 2):
        d.line([(k * kw, top), (k * kw, s)], fill=(60, 50, 40), width=1)
        if k % 7 not in (2, 6):  # the black keys' pattern
            d.rectangle([k * kw + kw * 0.65, top, k * kw + kw * 1.35, top + (s - top) * 0.6],
                        fill=(20, 15, 15))
    return img


def _img_space(rng: np.random.Generator, s: int) -> Image.Image:
    arr = np.zeros((s, s, 3)) + np.array(_jit(rng, (8, 6, 22), 6), float)
    for _ in range(int(rng.integers(2, 4))):  # nebula glow
        arr += rng.uniform(0.5, 0.9) * _blob(s, rng.uniform(0, s), rng.uniform(0, s),
                                             rng.uniform(0.15, 0.3) * s) \
            * np.array(_jit(rng, (140, 50, 160) if rng.random() < 0.6 else (200, 70, 130), 30),
                       float)
    n = int(rng.integers(60, 140))
    ys, xs = rng.integers(0, s, n), rng.integers(0, s, n)
    arr[ys, xs] = rng.uniform(150, 255, (n, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 3))):
        px, py = rng.uniform(0.2, 0.8) * s, rng.uniform(0.2, 0.8) * s
        pr = rng.uniform(0.07, 0.16) * s
        color = _jit(rng, ((210, 150, 90), (90, 140, 220), (200, 90, 70))[int(rng.integers(3))], 20)
        d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=color)
        if rng.random() < 0.6:
            d.ellipse([px - 1.9 * pr, py - 0.45 * pr, px + 1.9 * pr, py + 0.45 * pr],
                      outline=_jit(rng, (230, 220, 190), 15), width=2)
    return img


DRAW = {"ocean": _img_ocean, "forest": _img_forest, "fire": _img_fire, "city_night": _img_city,
        "desert": _img_desert, "snow": _img_snow, "jazz_club": _img_jazz, "space": _img_space}


def _render_image(rng: np.random.Generator, theme: str, fmt: str) -> bytes:
    size = int(rng.choice(IMAGE_SIZES))
    img = DRAW[theme](rng, size).filter(ImageFilter.GaussianBlur(0.6))
    # Mild sensor-like noise; less for PNG, whose size grows fast with noise.
    sigma = 1.5 if fmt == "PNG" else 4.0
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, sigma, (size, size, 3))
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=80)
    elif fmt == "WEBP":
        img.save(buf, format="WEBP", quality=80, method=4)
    else:
        img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- audio

def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """White noise band-limited to lo..hi Hz (FFT mask), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spec *= (f >= lo) & (f <= hi)
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _env(n: int, attack: float, tau: float) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    return np.minimum(t / attack, 1.0) * np.exp(-t / tau)


def _place(y: np.ndarray, start: int, note: np.ndarray) -> None:
    end = min(len(y), start + len(note))
    if start < end:
        y[start:end] += note[: end - start]


def _snd_ocean(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    f0 = float(rng.choice([55.0, 61.7, 65.4, 73.4, 82.4]))
    drone = (np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(2 * np.pi * 2 * f0 * t + rng.uniform(0, 6))
             + 0.3 * np.sin(2 * np.pi * 3.01 * f0 * t))
    swell = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(0.5, 0.9) * t + rng.uniform(0, 6.3))
    surf = _band_noise(rng, len(t), 100, 900)
    return 0.7 * drone * swell + 0.25 * surf * swell**2


def _snd_forest(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    y = 0.08 * _band_noise(rng, len(t), 200, 1200)
    for _ in range(int(rng.integers(4, 9))):
        n = int(rng.uniform(0.05, 0.14) * SAMPLE_RATE)
        f_a = rng.uniform(2500, 4200)
        f = np.linspace(f_a, f_a * rng.uniform(0.75, 1.3), n) * (1 + 0.03 * np.sin(
            2 * np.pi * rng.uniform(20, 40) * np.arange(n) / SAMPLE_RATE))
        chirp = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * np.hanning(n)
        _place(y, int(rng.integers(0, len(t) - n)), rng.uniform(0.5, 1.0) * chirp)
    return y


def _snd_fire(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    y = 0.35 * _band_noise(rng, len(t), 30, 250)
    n_crackle = int(rng.uniform(25, 45) * t[-1])
    for start in rng.integers(0, len(t), n_crackle):
        n = int(rng.integers(16, 100))
        burst = rng.standard_normal(n) * np.exp(-np.arange(n) / (n / 4))
        _place(y, int(start), rng.uniform(0.3, 1.0) * burst)
    return y


def _snd_city(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    y = 0.04 * np.sin(2 * np.pi * 100 * t)
    eighth = 60 / rng.uniform(110, 128) / 2
    root = float(rng.choice([55.0, 65.4, 73.4]))
    pattern = root * np.array([1, 6 / 5, 4 / 3, 3 / 2, 9 / 5])[rng.integers(0, 5, 8)]
    n_note = int(eighth * SAMPLE_RATE)
    tn = np.arange(n_note) / SAMPLE_RATE
    n_hat = int(0.02 * SAMPLE_RATE)
    hat = _band_noise(rng, n_hat, 5000, 7900) * _env(n_hat, 0.001, 0.005)
    for k in range(int(t[-1] / eighth) + 1):
        f = pattern[k % 8]
        sq = sum(np.sin(2 * np.pi * h * f * tn) / h for h in (1, 3, 5, 7))
        _place(y, int(k * n_note), 0.8 * sq * _env(n_note, 0.005, 0.12))
        if k % 2:
            _place(y, int(k * n_note), 0.25 * hat)
    return y


def _snd_desert(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    wind = _band_noise(rng, len(t), 300, 2000) * (0.5 + 0.5 * np.sin(
        2 * np.pi * rng.uniform(0.3, 0.6) * t + rng.uniform(0, 6.3)))
    y = 0.25 * wind
    base = float(rng.choice([293.7, 329.6, 349.2]))
    ratios = np.array([1, 16 / 15, 5 / 4, 4 / 3, 3 / 2, 8 / 5, 9 / 5])  # phrygian dominant
    k = int(rng.integers(2, 4))
    n_note = len(t) // k
    tn = np.arange(n_note) / SAMPLE_RATE
    for i, f in enumerate(base * ratios[rng.integers(0, 7, k)]):
        ph = 2 * np.pi * np.cumsum(f * (1 + 0.006 * np.sin(2 * np.pi * 5.5 * tn))) / SAMPLE_RATE
        tone = np.sin(ph) + 0.4 * np.sin(2 * ph) + 0.25 * np.sin(3 * ph)
        env = np.minimum(tn / 0.08, 1) * np.minimum((tn[-1] - tn) / 0.1, 1)
        _place(y, i * n_note, 0.5 * tone * env)
    return y


def _snd_snow(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    y = 0.01 * _band_noise(rng, len(t), 2000, 6000)
    base = float(rng.choice([1046.5, 1174.7, 1318.5]))
    ratios = np.array([1, 9 / 8, 5 / 4, 3 / 2, 5 / 3, 2])  # major pentatonic + octave
    n_note = int(0.9 * SAMPLE_RATE)
    tn = np.arange(n_note) / SAMPLE_RATE
    for start in np.sort(rng.uniform(0, t[-1] * 0.8, int(rng.integers(3, 7)))):
        f = base * ratios[int(rng.integers(0, 6))]
        partials = ((1, 1.0), (2.76, 0.4), (5.4, 0.15))  # inharmonic, bell-like
        bell = sum(a * np.sin(2 * np.pi * p * f * tn) for p, a in partials
                   if p * f < SAMPLE_RATE / 2)
        _place(y, int(start * SAMPLE_RATE), rng.uniform(0.4, 1.0) * bell * _env(n_note, 0.002, 0.3))
    return y


def _snd_jazz(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    y = np.zeros_like(t)
    beat = 60 / rng.uniform(96, 132)
    root = float(rng.choice([110.0, 123.5, 130.8, 146.8]))
    chords = ((9 / 8, (1, 6 / 5, 3 / 2, 9 / 5)), (3 / 4, (1, 5 / 4, 3 / 2, 16 / 9)),
              (1.0, (1, 5 / 4, 3 / 2, 15 / 8)))  # ii7 - V7 - Imaj7
    n_stab, n_bass = int(0.4 * SAMPLE_RATE), int(beat * SAMPLE_RATE)
    ts, tb = np.arange(n_stab) / SAMPLE_RATE, np.arange(n_bass) / SAMPLE_RATE
    n_brush = int(0.08 * SAMPLE_RATE)
    brush = _band_noise(rng, n_brush, 2000, 6000) * np.hanning(n_brush)
    for b in range(int(t[-1] / beat) + 1):
        shift, chord = chords[(b // 2) % 3]
        r = root * shift
        for when in (b * beat, b * beat + 2 * beat / 3):  # swung eighths
            if rng.random() < 0.55:
                stab = sum(np.sin(2 * np.pi * r * c * ts) + 0.3 * np.sin(4 * np.pi * r * c * ts)
                           for c in chord)
                _place(y, int(when * SAMPLE_RATE), 0.25 * stab * _env(n_stab, 0.004, 0.18))
        fb = r / 2 * (1, 5 / 4, 3 / 2, 5 / 3)[b % 4]  # walking bass
        bass = np.sin(2 * np.pi * fb * tb) * _env(n_bass, 0.01, 0.3)
        _place(y, int(b * beat * SAMPLE_RATE), 0.7 * bass)
        if b % 2:
            _place(y, int(b * beat * SAMPLE_RATE), 0.12 * brush)
    return y


def _snd_space(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    glide = 40 + rng.uniform(3, 8) * t
    y = 0.35 * np.sin(2 * np.pi * np.cumsum(glide) / SAMPLE_RATE)
    base = float(rng.choice([392.0, 440.0, 523.3]))
    ratios = np.array([1, 9 / 8, 3 / 2, 2, 9 / 4, 3])
    order = np.concatenate([np.arange(6), np.arange(4, 0, -1)])  # up and down
    step = 1 / rng.uniform(10, 16)
    n_note = int(0.25 * SAMPLE_RATE)
    tn = np.arange(n_note) / SAMPLE_RATE
    arp = np.zeros_like(t)
    for k in range(int(t[-1] / step) + 1):
        f = base * ratios[order[k % len(order)]]
        note = np.sin(2 * np.pi * f * tn) * _env(n_note, 0.005, 0.08)
        _place(arp, int(k * step * SAMPLE_RATE), note)
    for delay, gain in ((0.18, 0.5), (0.36, 0.25)):  # echo
        d = int(delay * SAMPLE_RATE)
        arp[d:] += gain * arp[:-d].copy()
    return y + 0.4 * arp


SYNTH = {"ocean": _snd_ocean, "forest": _snd_forest, "fire": _snd_fire, "city_night": _snd_city,
         "desert": _snd_desert, "snow": _snd_snow, "jazz_club": _snd_jazz, "space": _snd_space}


def _render_audio(rng: np.random.Generator, theme: str, fmt: str, subtype: str,
                  serial: int) -> bytes:
    dur = round(float(rng.uniform(1.0, 2.0)), 1)
    t = np.arange(int(round(dur * SAMPLE_RATE))) / SAMPLE_RATE
    y = SYNTH[theme](rng, t)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.015)
    y = y * fade / (np.max(np.abs(y)) + 1e-12) * rng.uniform(0.5, 0.85)
    buf = io.BytesIO()
    sf.write(buf, y.astype(np.float32), SAMPLE_RATE, format=fmt, subtype=subtype)
    data = buf.getvalue()
    return _fix_ogg_serial(data, serial) if fmt == "OGG" else data


# ----------------------------------------------------------------------------- tables

def _items(rng: np.random.Generator, n_items: int) -> tuple[pl.DataFrame, np.ndarray]:
    """Item table and each item's theme index (ids are not grouped by theme)."""
    n_themes = len(THEME_NAMES)
    theme_idx = rng.permutation(np.resize(np.arange(n_themes), n_items))
    missing = {m: rng.random(n_items) < p for m, p in MISSING_SHARE.items()}
    img_fmt = rng.choice(len(IMAGE_FORMATS), n_items, p=[f[2] for f in IMAGE_FORMATS])
    aud_fmt = rng.choice(len(AUDIO_FORMATS), n_items, p=[f[3] for f in AUDIO_FORMATS])
    tiers = np.array([0.99, 1.99, 2.99, 3.99, 4.99, 6.99, 9.99, 14.99])
    rows = []
    for i in range(n_items):
        th = THEMES[THEME_NAMES[theme_idx[i]]]
        r = rng.random()
        brand = th.brand if r < 0.65 else (_pick(rng, GENERAL_BRANDS) if r < 0.9
                                           else THEMES[_pick(rng, THEME_NAMES)].brand)
        item_id = f"i{i + 1:04d}"
        title = _title(rng, th)
        description = None if missing["description"][i] else _description(rng, th, brand)
        tags = _tags(rng, th)
        tier, markup = int(rng.integers(0, 6)), int(rng.integers(0, 3))
        rows.append({
            "item_id": item_id,
            "title": title,
            "description": description,
            "tags": tags,
            "image": (None if missing["image"][i]
                      else f"images/{item_id}.{IMAGE_FORMATS[img_fmt[i]][0]}"),
            "audio": (None if missing["audio"][i]
                      else f"audio/{item_id}.{AUDIO_FORMATS[aud_fmt[i]][0]}"),
            # generalist labels sell cheaper: a weak attribute signal for the ranker
            "price": float(tiers[min(tier + markup * (brand not in GENERAL_BRANDS), 7)]),
            "brand": brand,
        })
    schema = {"item_id": pl.String, "title": pl.String, "description": pl.String, "tags": pl.String,
              "image": pl.String, "audio": pl.String, "price": pl.Float64, "brand": pl.String}
    return pl.DataFrame(rows, schema=schema), theme_idx


def _users(rng: np.random.Generator, n_users: int,
           n_cold: int) -> tuple[pl.DataFrame, list[list[str]]]:
    """User table (profile text for ~30 % and for every cold user) and favourite themes."""
    favs: list[list[str]] = []
    texts: list[str | None] = []
    for u in range(n_users):
        k = 1 if rng.random() < 0.6 else 2
        fav = [THEME_NAMES[j] for j in rng.choice(len(THEME_NAMES), k, replace=False)]
        if u >= n_users - n_cold:  # cold users: one theme each, spread over themes
            fav = [THEME_NAMES[(u * 3) % len(THEME_NAMES)]]
        favs.append(fav)
        texts.append(_profile(rng, fav) if (u >= n_users - n_cold or rng.random() < 0.3) else None)
    users = pl.DataFrame({"user_id": [f"u{u + 1:04d}" for u in range(n_users)], "text": texts},
                         schema={"user_id": pl.String, "text": pl.String})
    return users, favs


def _interactions(rng: np.random.Generator, theme_idx: np.ndarray, complete: np.ndarray,
                  favs: list[list[str]], n_warm: int) -> pl.DataFrame:
    """Simulated event log: mostly favourite-theme items, skewed popularity, a funnel."""
    n_items, n_themes = len(theme_idx), len(THEME_NAMES)
    # One never-touched item per theme (cold items) with every modality, so the demo can
    # show items served from content alone.
    cold = []
    for k in range(n_themes):
        members = np.flatnonzero(theme_idx == k)
        full = members[complete[members]]
        if len(members):  # tiny test runs may lack a theme or a complete item
            cold.append(int(rng.choice(full if len(full) else members)))
    # Zipf-like popularity within each theme on a random ranking.
    pop = np.zeros(n_items)
    for k in range(n_themes):
        members = rng.permutation(np.flatnonzero(theme_idx == k))
        pop[members] = 1.0 / (np.arange(len(members)) + 1.0) ** 0.7
    pop[np.array(cold, dtype=int)] = 0.0
    start = END_TS - DAYS * 86_400
    users, items, ts, events, values = [], [], [], [], []
    for u in range(n_warm):
        fav = [THEME_NAMES.index(f) for f in favs[u]]
        fav_w = np.array([1.0]) if len(fav) == 1 else np.array([0.6, 0.4])
        n = int(np.clip(np.rint(np.exp(rng.normal(np.log(16), 0.9))), 2, 150))  # long tail
        p_in = rng.uniform(0.75, 0.9)
        first_day = rng.uniform(0, 60)
        for _ in range(n):
            if rng.random() < p_in:
                k = fav[int(rng.choice(len(fav), p=fav_w))]
                w = np.where(theme_idx == k, pop, 0.0)
            else:
                w = pop
            item = int(rng.choice(n_items, p=w / w.sum()))
            in_theme = int(theme_idx[item]) in fav
            # Evening-heavy time of day.
            hour = rng.normal(20.5, 2.0) % 24 if rng.random() < 0.7 else rng.uniform(0, 24)
            day = int(start + rng.uniform(first_day, DAYS - 0.5) * 86_400) // 86_400
            t = day * 86_400 + int(hour * 3600)
            t = min(t, END_TS - 7200)
            steps = [("view", t, None)]
            p_click, p_cart, p_buy = (0.45, 0.35, 0.55) if in_theme else (0.2, 0.2, 0.35)
            if rng.random() < p_click:
                t += int(rng.integers(5, 120))
                steps.append(("click", t, None))
                if rng.random() < p_cart:
                    t += int(rng.integers(30, 600))
                    steps.append(("cart", t, None))
                    if rng.random() < p_buy:
                        t += int(rng.integers(60, 3600))
                        rating = None
                        if rng.random() < 0.7:
                            rating = float(rng.choice([3, 4, 5], p=[0.15, 0.4, 0.45]) if in_theme
                                           else rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15]))
                        steps.append(("purchase", t, rating))
            for ev, when, val in steps:
                users.append(f"u{u + 1:04d}")
                items.append(f"i{item + 1:04d}")
                ts.append(when)
                events.append(ev)
                values.append(val)
    df = pl.DataFrame({"user_id": users, "item_id": items, "timestamp": ts, "event": events,
                       "value": values},
                      schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64,
                              "event": pl.String, "value": pl.Float64})
    order = pl.col("event").replace_strict(list(EVENTS), list(range(len(EVENTS))),
                                           return_dtype=pl.Int8)
    return df.sort([pl.col("timestamp"), pl.col("user_id"), pl.col("item_id"), order])


# ----------------------------------------------------------------------------- driver

MEDIA_NAME = re.compile(r"^i\d{4}\.(jpg|png|webp|flac|ogg)$")


def make_sample(out_dir: str | Path, seed: int = SEED, n_items: int = N_ITEMS,
                n_users: int = N_USERS, media: bool = True) -> dict[str, int]:
    """Write items.csv, users.csv, interactions.csv, themes.json and media into out_dir.

    Returns counts. Same seed and sizes give byte-identical files. With media=False
    only the tables and themes.json are written (the tables still name the media paths).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Independent streams per part, so changing one part leaves the others' draws alone.
    s_items, s_users, s_inter = (np.random.default_rng(s)
                                 for s in np.random.SeedSequence(seed).spawn(3))
    items, theme_idx = _items(s_items, n_items)
    users, favs = _users(s_users, n_users, N_COLD_USERS)
    complete = items.select(
        pl.all_horizontal(pl.col("image", "audio", "description").is_not_null()))
    inter = _interactions(s_inter, theme_idx, complete.to_series().to_numpy(), favs,
                          n_users - N_COLD_USERS)

    written: set[str] = set()
    if media:
        fmt_of = {ext: (fmt, sub) for ext, fmt, sub, _ in AUDIO_FORMATS}
        img_fmt = {ext: fmt for ext, fmt, _ in IMAGE_FORMATS}
        for i, (img, aud) in enumerate(zip(items["image"].to_list(), items["audio"].to_list())):
            theme = THEME_NAMES[theme_idx[i]]
            # Each item draws from its own child stream: a missing file shifts nothing else.
            r_img = np.random.default_rng([seed, 1, i])
            r_aud = np.random.default_rng([seed, 2, i])
            if img is not None:
                data = _render_image(r_img, theme, img_fmt[img.rsplit(".", 1)[1]])
                _atomic_write(out / img, data)
                written.add(img)
            if aud is not None:
                fmt, sub = fmt_of[aud.rsplit(".", 1)[1]]
                _atomic_write(out / aud, _render_audio(r_aud, theme, fmt, sub, serial=i + 1))
                written.add(aud)
        for sub in ("images", "audio"):  # drop stale media from an earlier, different run
            for p in sorted((out / sub).glob("*")):
                if MEDIA_NAME.match(p.name) and f"{sub}/{p.name}" not in written:
                    p.unlink()

    for name, df in (("items", items), ("users", users), ("interactions", inter)):
        buf = io.BytesIO()
        df.write_csv(buf)
        _atomic_write(out / f"{name}.csv", buf.getvalue())

    touched = set(inter["item_id"].to_list())
    active = set(inter["user_id"].to_list())
    truth = {
        "seed": seed,
        "themes": {k: {"label": th.label, "image": th.image_style, "audio": th.audio_style,
                       "tags": list(th.tags)} for k, th in THEMES.items()},
        "items": dict(zip(items["item_id"].to_list(), [THEME_NAMES[k] for k in theme_idx])),
        "users": dict(zip(users["user_id"].to_list(), favs)),
        "cold_items": sorted(set(items["item_id"].to_list()) - touched),
        "cold_users": sorted(set(users["user_id"].to_list()) - active),
    }
    _atomic_write(out / "themes.json", (json.dumps(truth, indent=1) + "\n").encode())
    return {"items": items.height, "users": users.height, "interactions": inter.height,
            "media_files": len(written)}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-media", action="store_true", help="tables and themes.json only")
    args = parser.parse_args()
    counts = make_sample(args.out, seed=args.seed, media=not args.no_media)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    parts = ["items.csv", "users.csv", "interactions.csv", "themes.json", "images", "audio"]
    for part in parts:
        if (args.out / part).exists():
            print(f"{part:<18}{_size(args.out / part) / 1024:>9.1f} KiB")
    print(f"{'data/ total':<18}{_size(args.out) / 1024:>9.1f} KiB")


if __name__ == "__main__":
    main()
