"""Stage 3 machinery: rollouts, advantages, KL control and the compiled PPO iteration."""
