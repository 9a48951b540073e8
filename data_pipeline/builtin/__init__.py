"""The built-in corpus: a generator of simple English children's stories and data derived from them.

It lets every stage of the pipeline run offline (no hub, no shared data): pretraining text,
instruction and chat data for SFT, preference pairs for DPO-style alignment, and prompts with
checkable answers for RL. Everything is deterministic by seed.
"""
from data_pipeline.builtin.stories import Story, generate_stories, generate_story, generate_story_records
from data_pipeline.builtin.tasks import generate_conversations, generate_instructions, generate_preferences
from data_pipeline.builtin.verifiable import generate_verifiable_prompts

__all__ = [
    "Story", "generate_stories", "generate_story", "generate_story_records",
    "generate_instructions", "generate_conversations", "generate_preferences",
    "generate_verifiable_prompts",
]
