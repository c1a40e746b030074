"""bench/corpus.py: the stdlib calibration prose is read from source text (docstrings, comment runs), keeps
English sentences only, and never contains a held-out ``zoo.sentences`` sentence."""
from graphopt.bench import corpus

SOURCE = '''"""Module summary that is long enough to count as prose. Second sentence of the module docstring here.

    >>> print("an indented doctest line")
"""
import os  # Short.

# This comment runs over
# two lines and forms one sentence.
def f(x):
    """Return x_plus_one when asked nicely by the caller."""
    return x + 1
'''


def test_docstrings_and_comment_runs_are_read_as_text():
    assert list(corpus._docstrings(SOURCE)) == [
        "Module summary that is long enough to count as prose. Second sentence of the module docstring here.",
        "Return x_plus_one when asked nicely by the caller."]
    assert list(corpus._comments(SOURCE)) == ["Short.", "This comment runs over two lines and forms one sentence."]


def test_prose_filter():
    assert corpus.is_prose("This comment runs over two lines and forms one sentence.")
    assert not corpus.is_prose("Return x_plus_one when asked nicely by the caller.")     # an identifier
    assert not corpus.is_prose("Short.")                                                # too few words
    assert not corpus.is_prose("see the os.path module for more of the details.")       # lower-case start, a.b
    assert not corpus.is_prose("Call f(x) and then return whatever it gives back to you.")


def test_calibration_texts_hold_no_evaluation_sentence_and_are_deterministic():
    from graphopt.zoo.sentences import all_sentences

    held_out = {" ".join(s.lower().split()) for s in all_sentences()}
    texts = corpus.calibration_texts("mix", 200)
    assert len(texts) == len(set(texts)) == 200
    assert not {" ".join(s.lower().split()) for s in corpus.stdlib_sentences()} & held_out
    assert texts == corpus.calibration_texts("mix", 200)


def test_short_sentences_are_two_to_five_word_prose_and_mixshort_holds_no_evaluation_sentence():
    from graphopt.zoo.sentences import all_sentences

    assert corpus.is_prose("Remove an option.", min_words=2) and not corpus.is_prose("Remove an option.")
    short = corpus.short_sentences()
    assert len(short) > 1000 and all(2 <= len(s.split()) <= 5 for s in short)
    assert not set(short) & set(corpus.stdlib_sentences())
    held_out = {" ".join(s.lower().split()) for s in all_sentences()}
    texts = corpus.calibration_texts("mixshort", 200)
    assert len(texts) == len(set(texts)) == 200
    assert sum(len(s.split()) <= 5 for s in texts) >= 50
    assert not {" ".join(s.lower().split()) for s in texts + list(short)} & held_out
