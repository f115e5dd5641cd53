"""Every number the pipeline shares, defined once. Torch-free, so the cost model and tests can import it.

Token ids are the real LLaDA-8B-Instruct tokenizer's. The built-in small model has its own, smaller
tokenizer whose ids live in its config/tokenizer, so code reads ids from the tokenizer or config and
uses these only as the defaults of a real LaViDa config.
"""

# ---- prompt placeholders and LLaDA token ids -------------------------------------------------------
IMAGE_TOKEN_INDEX = -200  # placeholder id for `<image>` in input_ids; never embedded
IGNORE_INDEX = -100  # label ignored by the loss
DEFAULT_IMAGE_TOKEN = "<image>"

EOS_TOKEN_ID = 126081  # <|endoftext|>: end of answer AND the pad token (answers are padded with it)
PAD_TOKEN_ID = EOS_TOKEN_ID
MASK_TOKEN_ID = 126336  # <|mdm_mask|>: the diffusion mask
LLADA_EMBEDDING_SIZE = 126464  # rows of wte and of the untied LM head

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

# ---- SigLIP-so400m geometry (the small model keeps it: same 384/14 token grid) -------------------------
SIGLIP_IMAGE_SIZE = 384
SIGLIP_PATCH_SIZE = 14
SIGLIP_GRID = SIGLIP_IMAGE_SIZE // SIGLIP_PATCH_SIZE  # 27 tokens per side of a 384² view (729)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# LaViDa's any-res grids, (width, height): one 384² global view plus up to 4 tiles.
DEFAULT_GRID_PINPOINTS = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))
POOLED_GRID = (SIGLIP_GRID + 1) // 2  # bilinear 27 -> 14 per view (196 tokens): LaViDa's default pooling
ANYRES_VIEWS = 5  # global + a 2x2 grid: 5 x 196 = 980 nominal pooled tokens

# ---- SHIRG and the equal-token budget -------------------------------------------------------------------
FOVEA_SIZE = 448  # SHIRG's foveal view side in pixels
FOVEA_GRID = FOVEA_SIZE // SIGLIP_PATCH_SIZE  # 32 tokens per side (positions interpolated 27 -> 32)
FOVEA_TOKENS = FOVEA_GRID * FOVEA_GRID  # 1024
SHIRG_GLOBAL_GRID = 16  # the 384² global view's 27x27 tokens resized to 16x16
SHIRG_GLOBAL_TOKENS = SHIRG_GLOBAL_GRID * SHIRG_GLOBAL_GRID  # 256
TOKEN_BUDGET = ANYRES_VIEWS * POOLED_GRID * POOLED_GRID  # 980: LaViDa's nominal pooled count, every method's budget
SHIRG_KEPT = TOKEN_BUDGET - SHIRG_GLOBAL_TOKENS  # 724 foveal tokens kept, so global + fovea = 980
DEFAULT_KEEP_RATIO = SHIRG_KEPT / FOVEA_TOKENS  # 0.707; the keep-ratio ablation flag's default

# SHIRG score weights: v1 = A·a + S·s; v2 = softmax((A2·a + S2·s - D·d) / T)
SCORE_V1_ATTN = 0.7
SCORE_V1_SIM = 0.3
SCORE_V2_ATTN = 0.5
SCORE_V2_SIM = 0.3
SCORE_V2_DIVERSITY = 0.1
SCORE_V2_TEMPERATURE = 0.15
