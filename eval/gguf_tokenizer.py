"""The tokenizer of a model, with a repair for Gemma GGUF files: transformers 5.x builds a
Unigram tokenizer from their BPE vocabulary, which splits words into fragments and adds no <bos>."""
from pathlib import Path

from transformers import AutoTokenizer

__all__ = ["load_tokenizer"]


def sentencepiece_bpe_tokenizer(fields):
    """A tokenizer for a GGUF whose vocabulary is SentencePiece BPE ("llama" tokenizer model with
    merge ranks as scores, as in Gemma 3), rebuilt as a BPE whose merges follow those scores.
    fields: a gguf.GGUFReader's fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    pieces = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    normal, control, user_defined = 1, 3, 4
    # SentencePiece writes a space as "▁"; GGUF files store whitespace-only pieces as spaces.
    pieces = ["▁" * len(p) if p and not p.strip(" ") else p for p in pieces]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    mergeable = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == normal}
    merges = generate_merges(mergeable, {p: scores[i] for p, i in mergeable.items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[
        fields["tokenizer.ggml.unknown_token_id"].contents()], byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_tokens([AddedToken(p, normalized=False) for p, t in zip(pieces, types)
                        if t == user_defined])
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, t in zip(pieces, types) if t == control])

    def token(field):
        return pieces[fields[field].contents()] if field in fields else None

    bos = token("tokenizer.ggml.bos_token_id")
    add_bos = fields["tokenizer.ggml.add_bos_token"].contents() \
        if "tokenizer.ggml.add_bos_token" in fields else True
    if bos and add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"))
    if "tokenizer.chat_template" in fields:
        tokenizer.chat_template = fields["tokenizer.chat_template"].contents()
    return tokenizer


def load_tokenizer(directory, gguf_file):
    """The model's tokenizer. For Gemma GGUF files transformers 5.x builds a Unigram model from the
    BPE vocabulary, which splits words into fragments ("capital" -> "c", "ap", "it", "al") and
    adds no <bos>, so the model reads noise (loss 6.1 instead of 3.5 on Gemma 3 270M); those are
    rebuilt here from the file's vocabulary."""
    if gguf_file:
        from gguf import GGUFReader
        fields = GGUFReader(str(Path(directory) / gguf_file)).fields
        if fields["tokenizer.ggml.model"].contents() == "llama" and \
                fields["general.architecture"].contents().startswith("gemma"):
            return sentencepiece_bpe_tokenizer(fields)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
