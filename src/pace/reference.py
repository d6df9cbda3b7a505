"""PACE in paper notation: slow, float64, one coordinate-wise formula per line.

This is the oracle the tests hold every fast path of `pace.PACE` to. It keeps its
own float64 copy of theta, the moments and the EMA, so that rounding in the
parameter's dtype never enters the comparison; the parameter is overwritten with
theta_{t+1} after every step. Nothing here is tuned for speed.

    theta'      = theta_t * (1 - lr*wd) - lr * m_hat / (sqrt(v_hat) + eps)       AdamW
    w_t         = beta_ema                                     if kappa is None
                = max((1 + gamma*max(0, t - rho))^(-kappa), 1e-4)   otherwise   (the EMA's weight on the newest iterate)
    lambda_t    = min(lr * c * w_t / (sqrt(v_hat) + eps), 1)    (no min if not clamped)
    theta_{t+1} = theta' + lambda_t * (ema_{t-1} - theta_t)
    ema_t       = (1 - w_t) * ema_{t-1} + w_t * theta_{t+1}   if t % ema_update_freq == 0
"""

import torch
from torch.optim import Optimizer

MIN_EMA_WEIGHT = 1e-4  # floor on w_t, so that a decaying EMA never freezes


def ema_weight_at(t, beta_ema, kappa, rho, gamma):
    """w_t: the EMA's weight on the newest iterate at (1-based) step t."""
    if kappa is None:
        return beta_ema
    return max((1.0 + gamma * max(0.0, t - rho)) ** (-kappa), MIN_EMA_WEIGHT)


class PACEReference(Optimizer):
    """Float64 reference of PACE; same arguments as `pace.PACE` (implementation choices aside)."""

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        lambda_pullback=0.0,
        clamp_pullback=True,
        beta_ema=0.01,
        use_ema_eval=False,
        ema_kappa=None,
        ema_rho=0.0,
        ema_gamma=1.0,
        ema_update_freq=1,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            lambda_pullback=lambda_pullback,
            clamp_pullback=clamp_pullback,
            beta_ema=beta_ema,
            use_ema_eval=use_ema_eval,
            ema_kappa=ema_kappa,
            ema_rho=ema_rho,
            ema_gamma=ema_gamma,
            ema_update_freq=ema_update_freq,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            eps, wd, c = group["eps"], group["weight_decay"], group["lambda_pullback"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["t"] = 0
                    state["theta"] = p.detach().to(torch.float64).clone()
                    state["m"] = torch.zeros_like(state["theta"])
                    state["v"] = torch.zeros_like(state["theta"])
                    state["ema"] = state["theta"].clone()  # ema_0 = theta_1
                state["t"] += 1
                t = state["t"]
                g = p.grad.to(torch.float64)
                theta, ema = state["theta"], state["ema"]

                m = beta1 * state["m"] + (1 - beta1) * g
                v = beta2 * state["v"] + (1 - beta2) * g * g
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                theta_prime = theta * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)

                ema_weight = ema_weight_at(
                    t, group["beta_ema"], group["ema_kappa"], group["ema_rho"], group["ema_gamma"]
                )
                lam = lr * c * ema_weight / (v_hat.sqrt() + eps)
                if group["clamp_pullback"]:
                    lam = lam.clamp(max=1.0)
                theta_next = theta_prime + lam * (ema - theta)
                if t % group["ema_update_freq"] == 0:
                    ema = (1 - ema_weight) * ema + ema_weight * theta_next

                state.update(m=m, v=v, theta=theta_next, ema=ema)
                p.copy_(theta_next)
        return loss

    def ema(self, p):
        """ema_t of parameter p, in float64."""
        return self.state[p]["ema"]
