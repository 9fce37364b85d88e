"""dflash_jax.data: chat readers, template rendering with assistant-only masks, packing and a resumable iterator."""

from dflash_jax.data.chat import CHATML_TEMPLATE as CHATML_TEMPLATE
from dflash_jax.data.chat import ChatRenderer as ChatRenderer
from dflash_jax.data.chat import ChatTemplateError as ChatTemplateError
from dflash_jax.data.chat import RenderError as RenderError
from dflash_jax.data.chat import byte_chat_tokenizer as byte_chat_tokenizer
from dflash_jax.data.chat import load_chat_template as load_chat_template
from dflash_jax.data.pipeline import DataIterator as DataIterator
from dflash_jax.data.pipeline import TokenizedDataset as TokenizedDataset
from dflash_jax.data.pipeline import build_dataset as build_dataset
from dflash_jax.data.pipeline import build_iterator as build_iterator
from dflash_jax.data.pipeline import make_batch as make_batch
from dflash_jax.data.pipeline import prompt_of as prompt_of
from dflash_jax.data.readers import Conversation as Conversation
from dflash_jax.data.readers import Skip as Skip
from dflash_jax.data.readers import read_conversations as read_conversations
