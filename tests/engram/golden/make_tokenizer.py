# Builds a tiny byte-level BPE tokenizer (accents, case, whitespace variants, partial UTF-8 bytes).
import sys
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast
corpus = ["Only Alexander the Great could tame the horse Bucephalus.",
          "ONLY alexander THE great Café café CAFÉ naïve NAÏVE résumé Résumé",
          "tabs\tand\nnewlines  and   spaces", "ﬁne ﬁnest Ｆｕｌｌｗｉｄｔｈ １２３", "日本語のテキスト 漢字 emoji 🙂🙂",
          "Straße STRASSE Ångström ÅNGSTRÖM"] * 20
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(corpus, trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
fast.save_pretrained(sys.argv[1])
print(len(fast))
