"""A generic set of search queries written for umr, to calibrate compensators where an index
holds nothing of a query modality (a photo library has no texts to pair).

A compensator is only as good as the resemblance of its calibration texts to real queries:
prompts of one template ("a photo of a {class}") drift unlike free captions once an encoder is
trained on such prompts (docs/benchmarks.md, section continual). So the set mixes the forms
people type into an image search box (scene captions, product titles, keyword queries, short
object names) over a broad vocabulary, and `umr update` then keeps the part of it that lies
near the index's own documents (retrieval/pseudo_queries.py).

Written for umr (Apache-2.0 like the rest of it); no sentence comes from a data set.
"""
from __future__ import annotations

import random
from functools import lru_cache

PEOPLE = [
    "a man", "a woman", "a boy", "a girl", "a child", "a baby", "a young man", "a young woman", "an old man",
    "an old woman", "two men", "two women", "two children", "a group of people", "a crowd", "a family",
    "a couple", "a teenager", "a little girl", "a little boy", "a soccer player", "a cyclist", "a runner",
    "a surfer", "a skier", "a skateboarder", "a climber", "a chef", "a musician", "a police officer",
    "a farmer", "a student", "a tourist", "a dancer", "a swimmer", "a worker", "a doctor", "a bride and groom",
]
CLOTHES = [
    "in a red shirt", "in a blue jacket", "wearing a hat", "in a white dress", "in a black coat", "wearing glasses",
    "in a yellow raincoat", "in shorts", "in a green sweater", "in a striped shirt", "with a backpack",
    "in a helmet", "wearing sunglasses", "in a pink top", "in jeans", "in a uniform", "with long hair",
    "with a beard", "in a wetsuit", "in a costume",
]
ACTIONS = [
    "is running", "is walking", "is jumping", "is sitting", "is standing", "is riding a bike", "is climbing a rock",
    "is playing soccer", "is playing the guitar", "is reading a book", "is eating", "is cooking", "is swimming",
    "is surfing a wave", "is skiing", "is dancing", "is smiling", "is laughing", "is talking on the phone",
    "is taking a picture", "is holding an umbrella", "is throwing a ball", "is kicking a ball", "is waiting",
    "is sleeping", "is painting", "is working on a laptop", "is carrying a bag", "is pushing a stroller",
    "is crossing the street", "is skateboarding", "is fishing", "is hiking", "is riding a horse", "is playing",
    "is looking at the camera", "is drinking coffee", "is shopping", "is playing basketball", "is flying a kite",
]
ANIMALS = [
    "a dog", "a black dog", "a white dog", "a brown dog", "two dogs", "a puppy", "a cat", "a kitten", "a horse",
    "a cow", "a sheep", "a bird", "a duck", "a seagull", "a pigeon", "an eagle", "a parrot", "a fish", "a bear",
    "an elephant", "a giraffe", "a zebra", "a lion", "a tiger", "a monkey", "a deer", "a rabbit", "a squirrel",
    "a goat", "a pig", "a chicken", "a butterfly", "a bee", "a snake", "a turtle", "a frog", "a fox", "a wolf",
]
ANIMAL_ACTIONS = [
    "is running", "is jumping", "is sleeping", "is eating", "is drinking water", "is playing with a ball",
    "is swimming", "is flying", "is lying down", "is sitting", "is catching a frisbee", "is looking up",
    "is walking", "is chasing a stick", "is carrying a toy", "is standing still", "is resting", "is grazing",
]
PLACES = [
    "on the beach", "in the park", "in the snow", "on a city street", "in a field", "in the forest",
    "by the lake", "in the water", "on the grass", "in a kitchen", "in a living room", "at the office",
    "in a restaurant", "at a market", "on a mountain", "in the desert", "at night", "in the rain",
    "on a bridge", "in front of a building", "on a boat", "at the zoo", "in a garden", "on a sidewalk",
    "in a stadium", "on stage", "in a classroom", "at a train station", "at the airport", "in a shop",
    "near a river", "on a farm", "at sunset", "under a tree", "in the mountains", "by the pool",
    "in a library", "at a party", "on the road", "in a crowd",
]
OBJECTS = [
    "a red car", "a white truck", "a yellow bus", "a bicycle", "a motorcycle", "a train", "an airplane", "a boat",
    "a sailboat", "a tractor", "a laptop", "a phone", "a camera", "a pair of headphones", "a clock", "a lamp",
    "a chair", "a sofa", "a bed", "a table", "a bookshelf", "a guitar", "a piano", "a vase of flowers",
    "a cup of coffee", "a glass of wine", "a bottle", "a teapot", "a bowl of fruit", "a pizza", "a sandwich",
    "a cake", "a salad", "a plate of pasta", "a burger and fries", "a basket of bread", "a watch", "a handbag",
    "a suitcase", "an umbrella", "a kite", "a ball", "a toy", "a book", "a map", "a painting", "a statue",
    "a fountain", "a lighthouse", "a castle", "a church", "a tower", "a house", "a skyscraper", "a tent",
]
OBJECT_STATES = [
    "parked on the street", "on a wooden table", "on a white background", "in the sunlight", "next to a window",
    "on the floor", "on a shelf", "in the snow", "by the road", "on the water", "in a field", "at night",
    "in close-up", "from above", "covered in dust", "in the rain", "on display", "in a shop window",
]
LANDSCAPES = [
    "a snowy mountain under a blue sky", "a lake surrounded by trees", "a sunset over the sea", "a waterfall in a forest",
    "a field of sunflowers", "a sandy beach with palm trees", "a city skyline at night", "a foggy morning in the hills",
    "a river through a valley", "a desert with sand dunes", "autumn leaves in a park", "a rainbow over a field",
    "storm clouds over the ocean", "a quiet country road", "a harbour full of boats", "a frozen lake in winter",
    "a rocky coastline", "a green meadow with flowers", "a crowded market street", "an empty road in the desert",
    "the moon in the night sky", "stars over the mountains", "a garden in spring", "a busy intersection",
    "an old stone bridge", "a forest path", "a tropical island", "a vineyard on a hillside",
]
COLORS = ["black", "white", "red", "blue", "navy", "green", "grey", "beige", "brown", "pink", "yellow", "purple",
          "orange", "striped", "floral", "checked", "denim", "dark", "light blue", "olive"]
MATERIALS = ["cotton", "leather", "wool", "linen", "silk", "denim", "knit", "suede", "canvas", "polyester",
             "stainless steel", "wooden", "ceramic", "glass", "plastic", "bamboo"]
PRODUCTS = [
    "dress", "t-shirt", "shirt", "blouse", "sweater", "hoodie", "jacket", "coat", "jeans", "trousers", "shorts",
    "skirt", "sneakers", "boots", "sandals", "heels", "hat", "cap", "scarf", "gloves", "backpack", "handbag",
    "wallet", "belt", "watch", "sunglasses", "necklace", "earrings", "mug", "teapot", "lamp", "chair", "rug",
    "cushion", "vase", "knife set", "frying pan", "water bottle", "phone case", "headphones", "desk", "shelf",
]
FOR_WHOM = ["men's", "women's", "kids'", "unisex", "baby", "girls'", "boys'", ""]
PRODUCT_DETAILS = ["with pockets", "with a zip", "long sleeve", "short sleeve", "slim fit", "oversized", "vintage",
                   "waterproof", "for summer", "for winter", "classic", "with buttons", "size M", "with a hood",
                   "set of two", "handmade", "casual", "formal", "lightweight", "with laces"]
KEYWORDS = [
    "dog beach", "sunset", "wedding", "birthday party", "city at night", "mountain lake", "red dress", "running shoes",
    "street food", "coffee shop", "old car", "cat sleeping", "kids playing", "snow", "concert", "football match",
    "flowers", "portrait", "black and white photo", "aerial view", "skyline", "interior design", "breakfast",
    "summer holiday", "winter coat", "office desk", "forest", "ocean waves", "crowd", "selfie",
]


ADJECTIVES = ["small", "large", "young", "happy", "tired", "busy", "old", "wet", "muddy", "colorful", "smiling",
              "bright", "dark", "quiet", "crowded", "empty", "tall", "little", "beautiful", "sunny"]
LINKS = ["while", "as", "and", "next to", "behind", "in front of", "near", "with"]


def _person_caption(r: random.Random) -> str:
    who = r.choice(PEOPLE)
    dress = f" {r.choice(CLOTHES)}" if r.random() < 0.5 else ""
    end = " ." if r.random() < 0.5 else ""
    roll = r.random()
    if roll < 0.45:
        return f"{who.capitalize()}{dress} {r.choice(ACTIONS)} {r.choice(PLACES)}{end}"
    if roll < 0.65:  # two subjects, or a second clause
        other = r.choice(PEOPLE + ANIMALS)
        return f"{who.capitalize()}{dress} {r.choice(ACTIONS)} {r.choice(LINKS)} {other} {r.choice(PLACES)}{end}"
    if roll < 0.8:  # a scene first
        return f"{r.choice(PLACES).capitalize()} , {who}{dress} {r.choice(ACTIONS)}{end}"
    if roll < 0.9:  # a participle caption
        verb = r.choice(ACTIONS).removeprefix("is ")
        return f"{who.capitalize()}{dress} {verb} {r.choice(PLACES)}{end}"
    return f"{who.capitalize()} {r.choice(ACTIONS)} {r.choice(OBJECT_STATES)} with {r.choice(OBJECTS)}{end}"


def _animal_caption(r: random.Random) -> str:
    end = " ." if r.random() < 0.5 else ""
    animal = r.choice(ANIMALS)
    if r.random() < 0.3:
        animal = f"{animal.split(' ', 1)[0]} {r.choice(ADJECTIVES)} {animal.split(' ', 1)[1]}"
    if r.random() < 0.25:
        return (f"{animal.capitalize()} {r.choice(ANIMAL_ACTIONS)} {r.choice(LINKS)} {r.choice(PEOPLE + ANIMALS)} "
                f"{r.choice(PLACES)}{end}")
    return f"{animal.capitalize()} {r.choice(ANIMAL_ACTIONS)} {r.choice(PLACES)}{end}"


def _object_caption(r: random.Random) -> str:
    return f"{r.choice(OBJECTS)} {r.choice(OBJECT_STATES)}"


def _landscape(r: random.Random) -> str:
    scene = r.choice(LANDSCAPES)
    return scene if r.random() < 0.7 else f"a photo of {scene}"


def _product_title(r: random.Random) -> str:
    parts = [r.choice(FOR_WHOM), r.choice(COLORS), r.choice(MATERIALS) if r.random() < 0.6 else "", r.choice(PRODUCTS)]
    title = " ".join(p for p in parts if p)
    if r.random() < 0.5:
        title += f" {r.choice(PRODUCT_DETAILS)}"
    return title if r.random() < 0.5 else title.title()


def _keywords(r: random.Random) -> str:
    return r.choice(KEYWORDS) if r.random() < 0.6 else f"{r.choice(COLORS)} {r.choice(PRODUCTS)}"


def _short_object(r: random.Random) -> str:
    thing = r.choice(OBJECTS + ANIMALS)
    return thing if r.random() < 0.5 else f"a photo of {thing}"


# (form, share of the set)
FORMS = ((_person_caption, 0.25), (_animal_caption, 0.15), (_object_caption, 0.12), (_landscape, 0.08),
         (_product_title, 0.2), (_keywords, 0.1), (_short_object, 0.1))


def _agree(sentence: str) -> str:
    """'Two dogs is playing' -> 'Two dogs are playing'."""
    if sentence.lower().startswith(("two ", "three ")):
        return sentence.replace(" is ", " are ", 1)
    return sentence


@lru_cache(maxsize=4)
def generic_queries(n: int = 5000, seed: int = 0) -> tuple[str, ...]:
    """`n` distinct queries, the same ones for the same `n` and `seed` on every machine."""
    r = random.Random(seed)
    forms, weights = zip(*FORMS)
    out: dict[str, None] = {}
    budget = n * 20
    while len(out) < n and budget:
        budget -= 1
        out.setdefault(_agree(r.choices(forms, weights)[0](r)), None)
    return tuple(out)
