"""Special token ids and sentinels shared by every stage (values of the real LLaDA tokenizer).

The built-in small model uses its own, smaller tokenizer; its ids live in its config/tokenizer,
so code must read ids from the tokenizer or config, and use these only as upstream defaults.
"""

IMAGE_TOKEN_INDEX = -200  # placeholder id for `<image>` in input_ids; never embedded
IGNORE_INDEX = -100  # label ignored by the loss
DEFAULT_IMAGE_TOKEN = "<image>"

# LLaDA-8B-Instruct tokenizer ids
BOS_TOKEN_ID = 126080  # <|startoftext|>
EOS_TOKEN_ID = 126081  # <|endoftext|> (also the pad token)
FIM_TOKEN_ID = 126085  # <|reserved_token_1|>
FIM_FILLER_TOKEN_ID = 126086  # <|reserved_token_2|>
MASK_TOKEN_ID = 126336  # <|mdm_mask|>
START_HEADER_ID = 126346
END_HEADER_ID = 126347
EOT_TOKEN_ID = 126348  # <|eot_id|>

SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|reserved_token_1|>",
    "<|reserved_token_2|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)

# SigLIP-so400m geometry (the small model keeps it: same 384/14 token grid)
SIGLIP_IMAGE_SIZE = 384
SIGLIP_PATCH_SIZE = 14
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
FOVEA_SIZE = 448  # SHIRG foveal view side (32x32 tokens)

DEFAULT_GRID_PINPOINTS = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))  # (width, height)
