"""Tokenizers of the real transformers classes for the tiny model presets, built offline.

The real checkpoints' tokenizers (CLIP, T5, Gemma, Llama, Qwen2) cannot be downloaded here and no
package ships them, yet the stock diffusers pipelines call them (padding, truncation, chat
templates), so a preset needs a tokenizer of the very class its pipeline expects. Each function
here trains a small vocabulary on ``CORPUS``, a fixed built-in set of image prompts, and lays it
out like the real one (special tokens at the real ids or positions), so prompts split into
several word-like tokens as they would with the real vocabulary.

Everything is deterministic: a tokenizer built in two processes saves byte-identical files.
The BPE vocabularies are laid out from the merges alone (see ``_bpe_merges`` for how those are
kept the same in every process), and the T5 one is trained single-threaded by sentencepiece.
``vocab_size`` is an upper bound, as in sentencepiece with ``hard_vocab_limit=False``: ``CORPUS``
fills 1000 for CLIP, Gemma, Llama and Qwen2 but not for T5, so a model config takes ``len(tokenizer)``.
"""

from __future__ import annotations

import io
import json

import sentencepiece
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, GemmaTokenizer, LlamaTokenizer, Qwen2Tokenizer, T5Tokenizer

_OBJECTS = (
    "cat", "dog", "horse", "fox", "owl", "rabbit", "tiger", "elephant", "whale", "butterfly",
    "dragon", "robot", "astronaut", "knight", "wizard", "sailor", "farmer", "child", "old woman",
    "castle", "lighthouse", "cottage", "bridge", "temple", "train", "bicycle", "sports car",
    "sailboat", "airplane", "hot air balloon", "teapot", "guitar", "piano", "clock", "lamp",
    "chair", "vase of flowers", "bowl of fruit", "apple", "lemon", "mushroom", "oak tree",
    "sunflower", "rose", "cactus", "mountain", "waterfall", "volcano", "island", "cup of coffee",
    "penguin", "octopus", "jellyfish", "parrot", "squirrel", "hedgehog", "panda", "giraffe",
    "samurai", "ballerina", "pirate", "chef", "musician", "scientist", "detective", "monk",
    "skyscraper", "windmill", "greenhouse", "bookshelf", "typewriter", "motorcycle", "submarine",
    "umbrella", "lantern", "crown", "sword", "treasure chest", "birthday cake", "strawberry",
    "pineapple", "pumpkin", "snowman", "kite", "telescope", "violin", "candle", "mirror",
)
_COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "grey", "golden", "silver", "turquoise", "crimson", "teal", "violet", "amber", "ivory",
    "emerald", "scarlet", "navy", "magenta", "pastel", "neon", "copper", "bronze", "lavender",
    "olive", "maroon", "cobalt", "indigo", "beige", "coral", "mint", "rainbow",
)
_QUALITIES = (
    "tiny", "giant", "ancient", "futuristic", "cozy", "glowing", "wooden", "glass", "metallic",
    "fluffy", "rusty", "shiny", "broken", "floating", "sleeping", "smiling", "mysterious",
    "colorful", "abandoned", "majestic", "cute", "steampunk", "frozen", "burning", "elegant",
    "friendly", "haunted", "miniature", "enormous", "delicate", "weathered", "translucent",
    "ornate", "minimalist", "whimsical", "gloomy", "cheerful", "lonely", "curious", "brave",
)
_SCENES = (
    "in a misty forest", "on a sandy beach", "in the desert", "on a snowy mountain",
    "in a busy city street", "under the sea", "in outer space", "at sunset", "at night",
    "in the rain", "in a kitchen", "in an old library", "on the moon", "in a garden",
    "in a field of flowers", "on a rooftop", "in a dark cave", "near a quiet lake",
    "in a crowded market", "at dawn", "in thick fog", "on a wooden table", "inside a cathedral",
    "by the river", "in a snowy village", "on a spaceship", "in a jungle", "at the train station",
    "in a medieval tavern", "on a frozen pond", "among cherry blossoms", "beside a campfire",
    "in a neon-lit alley", "over rolling hills", "inside a greenhouse", "in a cluttered workshop",
    "during a thunderstorm", "in a coral reef", "on a busy harbor", "in a museum hall",
)
_ACTIONS = (
    "sitting on a bench", "reading a book", "holding an umbrella", "wearing a straw hat",
    "playing the violin", "jumping over a fence", "drinking tea", "looking at the stars",
    "dancing in circles", "painting a portrait", "riding a skateboard", "climbing a ladder",
    "carrying a basket", "flying above the clouds", "swimming quietly", "chasing a butterfly",
    "building a sandcastle", "waving hello", "writing a letter", "cooking dinner",
    "walking through puddles", "sleeping by the window", "wrapped in a scarf", "exploring ruins",
)
_DETAILS = (
    "soft morning light", "dramatic shadows", "intricate details", "reflections in the water",
    "lens flare", "warm color palette", "cool blue tones", "volumetric light", "shallow depth of field",
    "wide angle view", "symmetrical composition", "golden hour glow", "gentle brush strokes",
    "rough textures", "muted colors", "vivid saturated colors", "long exposure", "dust particles",
    "falling snowflakes", "scattered leaves", "sparkling stars", "smooth gradients",
)
_STYLES = (
    "oil painting", "watercolor", "digital art", "photograph", "pencil sketch", "3D render",
    "pixel art", "anime style", "studio lighting", "cinematic lighting", "low poly",
    "impressionist painting", "ukiyo-e woodblock print", "charcoal drawing", "pop art",
    "art nouveau poster", "vaporwave", "claymation", "isometric illustration", "macro photo",
    "film still", "highly detailed, 4k", "8k, sharp focus", "bokeh, 35mm lens", "trending on artstation",
    "children's book illustration", "stained glass", "concept art", "comic book style",
    "baroque fresco", "surrealist painting", "polaroid snapshot", "blueprint diagram",
    "embroidered tapestry", "papercut collage", "ink wash painting", "mosaic tiles", "cyberpunk",
)
_TEMPLATES = (
    "A {style} of a {quality} {object} {action} {scene}.",
    "{style}: the {colour} {object} {scene}, {detail}",
    "Close-up of a {object} {action}, {colour} light, {style}",
    "two {quality} {object}s {scene}, {colour} and {colour2} tones",
    "It's a {colour} {object} {action}; {style}, {quality} mood.",
    "the {quality} {object} painted {colour} {scene} ({style}, {detail})",
    "Photo of 3 {colour} {object}s {scene}, shot at 1/250s, {detail}",
)


def _corpus() -> tuple[str, ...]:
    # Sentence i takes item i * stride of each list, and template i % 7. The strides differ and
    # are coprime to the lists' lengths, and 7 to those lengths too, so every item appears, in
    # every template, beside many others, with no random generator (whose stream may change
    # between Python versions).
    slots = {
        "object": (_OBJECTS, 1), "colour": (_COLOURS, 7), "quality": (_QUALITIES, 11), "scene": (_SCENES, 13),
        "style": (_STYLES, 17), "action": (_ACTIONS, 19), "detail": (_DETAILS, 23), "colour2": (_COLOURS, 29),
    }
    sentences = []
    for i in range(600):
        words = {slot: items[i * stride % len(items)] for slot, (items, stride) in slots.items()}
        sentences.append(_TEMPLATES[i % len(_TEMPLATES)].format(**words))
    return tuple(sentences)


CORPUS: tuple[str, ...] = _corpus()
"""The fixed English image prompts every vocabulary here is trained on."""

QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
"""Qwen2.5-VL's special tokens in its id order, after the BPE vocabulary as there: QwenImagePipeline's
chat template needs ``<|im_start|>`` / ``<|im_end|>``, and the edit pipelines the vision tokens."""


def _byte_characters() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in the order CLIP and Qwen2 number them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _words(normalizer: normalizers.Normalizer | None, pre_tokenizer: pre_tokenizers.PreTokenizer) -> list[str]:
    """``CORPUS`` split into the words a tokenizer with these two parts would apply its merges to."""
    words = []
    for sentence in CORPUS:
        if normalizer is not None:
            sentence = normalizer.normalize_str(sentence)
        words += [word for word, _ in pre_tokenizer.pre_tokenize_str(sentence)]
    return words


def _bpe_merges(words: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """BPE merges learnt on ``words``, most frequent first.

    The trainer numbers the characters in sorted order and breaks ties between equally frequent
    pairs by number, so the merges are the same in every process, as long as every symbol is a
    character: an ``end_of_word_suffix`` adds symbols it numbers in hash-map order, and then ties
    break differently from run to run.
    """
    tokenizer = Tokenizer(models.BPE())  # no pre-tokenizer: each item of ``words`` is one word
    tokenizer.train_from_iterator(words, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    return [(a, b) for a, b in json.loads(tokenizer.to_str())["model"]["merges"]]


def _vocabulary(
    base: list[str], merges: list[tuple[str, str]], after: list[str], vocab_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``base``, one token per merge (as many merges as fit), then ``after``: the ids follow from
    the merge order alone."""
    tokens = dict.fromkeys(base)
    kept = []
    for a, b in merges:
        if len(tokens) + len(after) >= vocab_size:
            break
        tokens.setdefault(a + b)  # two merges may make the same string: one token, both merges
        kept.append((a, b))
    tokens.update(dict.fromkeys(after))
    return {token: i for i, token in enumerate(tokens)}, kept


# CLIP's words end in a symbol carrying "</w>". To learn its merges from characters alone (see
# _bpe_merges), each word's last character trains as a private-use stand-in: this offset plus its code.
_END_OF_WORD = 0xF0000


def _end_of_word(symbol: str) -> str:
    """A symbol learnt with the stand-in last character, as CLIP spells it."""
    last = ord(symbol[-1])
    return symbol[:-1] + chr(last - _END_OF_WORD) + "</w>" if last >= _END_OF_WORD else symbol


def clip_tokenizer(vocab_size: int = 1000, max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer laid out as OpenAI's: byte characters, the same with ``</w>``, one token
    per merge, then ``<|startoftext|>`` and ``<|endoftext|>``, the highest id, as CLIPTextModel's
    pooling expects (its config's ``eos_token_id`` must be the tokenizer's). SD3's second CLIP
    tokenizer pads with ``"!"`` (id 0): pass ``pad_token="!"``."""
    bytes_ = _byte_characters()
    # Learn on words as the real class splits them (its normalizer and split regex).
    reference = CLIPTokenizer().backend_tokenizer
    words = [w[:-1] + chr(_END_OF_WORD + ord(w[-1])) for w in _words(reference.normalizer, reference.pre_tokenizer)]
    merges = [(_end_of_word(a), _end_of_word(b)) for a, b in _bpe_merges(words, vocab_size)]
    vocab, merges = _vocabulary(
        bytes_ + [b + "</w>" for b in bytes_], merges, ["<|startoftext|>", "<|endoftext|>"], vocab_size
    )
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)


def t5_tokenizer(vocab_size: int = 1000) -> T5Tokenizer:
    """A T5 tokenizer from a sentencepiece unigram model, ids as T5's: ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, then the pieces, then the 100 ``<extra_id_N>`` sentinels, ``<extra_id_0>`` last.
    sentencepiece because the ``tokenizers`` unigram trainer is not deterministic across
    processes. A unigram model keeps about one piece per distinct word, so ``CORPUS`` gives some
    545 pieces whatever more is asked."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        # T5Tokenizer built from a piece list has no normalizer: the pieces must be of raw text.
        normalization_rule_name="identity",
        num_threads=1,  # the E-step adds up per-thread float sums: a fixed count fixes their rounding
        minloglevel=2,  # else it logs its training to stderr
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    # Given a vocabulary, the class would append the sentinels from <extra_id_0>; T5's run backwards.
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)


def gemma_tokenizer(vocab_size: int = 1000) -> GemmaTokenizer:
    """A Gemma tokenizer as SANA's Gemma2 uses: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3,
    ``<mask>`` 4, the 256 ``<0xNN>`` byte-fallback tokens, then the corpus's characters and one
    token per merge; a space is ``▁`` and begins a word, with no prefix space, and ``<bos>`` is
    prepended. SanaPipeline sets ``padding_side = "right"`` itself before it pads to ``max_length``."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # The class does not split words (its normalizer turns spaces into "▁"), but the real
    # sentencepiece model learnt on words that start at "▁": learn so, to keep tokens within words.
    words = _words(None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True))
    characters = sorted(set("".join(words)))
    vocab, merges = _vocabulary(specials + byte_tokens + characters, _bpe_merges(words, vocab_size), [], vocab_size)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=8192)


LLAMA3_HEADER_TOKENS: tuple[str, ...] = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
"""Llama 3's chat-header special tokens: HunyuanVideoPipeline's prompt template is written with them."""


def llama_tokenizer(vocab_size: int = 1000) -> LlamaTokenizer:
    """A Llama tokenizer as HunyuanVideo's Llama 3 text encoder is driven: the class's own
    byte-fallback BPE (``▁`` for a space, a prefix space, ``<0xNN>`` for bytes outside the
    vocabulary, as Llama 2's sentencepiece model; real Llama 3 is byte-level BPE instead, which
    only changes how a prompt splits into tokens), laid out ``<unk>`` 0, ``<|begin_of_text|>`` 1,
    ``<|end_of_text|>`` 2, the 256 byte tokens, the corpus's characters, one token per merge,
    then ``LLAMA3_HEADER_TOKENS`` and ``<pad>`` as special tokens. ``<|begin_of_text|>`` is
    prepended; padding is on the right, as HunyuanVideoPipeline needs (it drops the template's
    first ``crop_start`` tokens, so they must come first)."""
    specials = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]
    after = [*LLAMA3_HEADER_TOKENS, "<pad>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # As for Gemma: the class does not split words, but learn on words that start at "▁".
    words = _words(None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True))
    characters = sorted(set("".join(words)))
    vocab, merges = _vocabulary(specials + byte_tokens + characters, _bpe_merges(words, vocab_size), after, vocab_size)
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        extra_special_tokens=list(LLAMA3_HEADER_TOKENS),
        add_bos_token=True,
        padding_side="right",
        model_max_length=131072,
    )


def qwen2_tokenizer(vocab_size: int = 1000) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer as Qwen-Image's Qwen2.5-VL uses: byte-level BPE (byte characters first,
    then one token per merge), then ``QWEN2_SPECIAL_TOKENS``, ``<|endoftext|>`` padding and
    ``<|im_end|>`` ending. QwenImagePipeline drops the tokens of its system prompt by a count
    (``prompt_template_encode_start_idx``, 34 for the real vocabulary), so a pipeline built with
    this tokenizer must set that count from it."""
    bytes_ = _byte_characters()
    reference = Qwen2Tokenizer().backend_tokenizer
    merges = _bpe_merges(_words(reference.normalizer, reference.pre_tokenizer), vocab_size)
    vocab, merges = _vocabulary(bytes_, merges, list(QWEN2_SPECIAL_TOKENS), vocab_size)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN2_SPECIAL_TOKENS[1:]),
        model_max_length=131072,
    )
