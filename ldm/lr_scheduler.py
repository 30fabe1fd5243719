"""Learning-rate warm-up schedules named in CompVis configs (``scheduler_config``)."""


class LambdaLinearScheduler:
    """Piecewise cycles of linear warm-up to ``f_max`` then linear decay to ``f_min``; a LambdaLR factor."""

    def __init__(self, warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval=0):
        if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths):
            raise ValueError("LambdaLinearScheduler: all lists must have one entry per cycle")
        # plain lists: LambdaLR saves this object's attributes in checkpoints, which must load with
        # torch.load(weights_only=True) (config ListConfigs would not)
        self.lr_warm_up_steps, self.f_start = list(warm_up_steps), list(f_start)
        self.f_min, self.f_max, self.cycle_lengths = list(f_min), list(f_max), list(cycle_lengths)
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)

    def find_in_interval(self, n):
        """Index of the cycle that step ``n`` falls in."""
        for interval, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return interval
        return len(self.cycle_lengths) - 1

    def __call__(self, n, **kwargs):
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if n < self.lr_warm_up_steps[cycle]:
            return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        t = (n - self.lr_warm_up_steps[cycle]) / max(1, self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle])
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (1 - t)
