"""PPO with a critic, its roles as Ray actor groups: the maths (`algorithms`), the roles, their placement
(`groups`) and the controller loop (`controller.run_ppo`)."""
