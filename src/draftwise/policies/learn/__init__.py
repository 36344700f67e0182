"""Learning tree policies offline: the round logger, replaying logged rounds, RADAR's REINFORCE and LTD's PPO,
and measuring this machine's round costs. Needs the [train] extra where it trains."""
