"""Train one experiment from experiments.json.

    python run_train.py --exp smoke                      # generated data, seconds on CPU
    python run_train.py --exp best --data-dir ~/data     # the tuned recipe on CIFAR-100
    python run_train.py --exp report --set lr=0.001 --epochs 5
    python run_train.py --exp best --resume              # continue from out/best.last.ckpt
    torchrun --standalone --nproc_per_node=4 run_train.py --exp best    # 4 GPUs, one run (docs/distributed.md)
"""
import argparse
import sys

import config
import console
import distributed
import stops
import trainer


def get_args_parser(add_help=True):
    """Flags shared by run_train.py, run_lrfind.py and run_grid.py; each maps to a config key."""
    p = argparse.ArgumentParser(add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (see config.py), e.g. --set lr=0.1 --set blocks=[2,2,2]")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--data-dir", help="folder holding cifar-100-python/ (default: $CIFAR100_ROOT or ./data)")
    p.add_argument("--out", dest="out_dir", help="output folder (default: out)")
    p.add_argument("--device", choices=config.CHOICES["device"], help="default auto: cuda, xpu or mps where there, else cpu")
    p.add_argument("--compile", action="store_const", const="on", help="torch.compile, or one error line where it cannot run (default auto: where it can)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="never torch.compile")
    p.add_argument("--seed", type=int, help="training seed (never changes the 45k/5k split)")
    p.add_argument("--deterministic", action="store_const", const=True, help="deterministic kernels (slower)")
    return p


def overrides(args):
    """(key, value) pairs from --set, then from the explicit flags, which win."""
    pairs = [config.parse_set(item) for item in args.set]
    for key in ("epochs", "data_dir", "out_dir", "device", "compile", "seed", "deterministic"):
        if getattr(args, key, None) is not None:
            pairs.append((key, getattr(args, key)))
    return pairs


def main():
    p = argparse.ArgumentParser(parents=[get_args_parser(add_help=False)], description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="best", help="experiment name in experiments.json (default: best)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<exp>.last.ckpt if it exists")
    p.add_argument("--experiments", default=config.EXPERIMENTS_FILE, metavar="FILE",
                   help="the experiments file to read --exp from (default: experiments.json beside this script)")
    args = p.parse_args()
    stops.install_stop_handlers()      # from here Ctrl-C, SIGTERM and SIGUSR1 ask for a stop (last.ckpt saved)
    try:
        cfg = config.resolve(args.exp, overrides(args), args.experiments)
        s = trainer.train(cfg, resume=args.resume)
    except config.UserError as e:       # under several processes every rank meets it: rank 0 says it
        sys.exit(f"error: {e}" if distributed.is_main() else 1)
    except stops.Preempted as e:
        if distributed.is_main():
            print(e, file=sys.stderr)
        sys.exit(e.status)
    except KeyboardInterrupt:           # a second Ctrl-C
        if distributed.is_main():
            print(stops.STOPPED_AT_ONCE, file=sys.stderr)
        sys.exit(stops.INTERRUPTED_EXIT)
    except RuntimeError as e:           # a collective whose peer died: one line, not a traceback per rank
        line = distributed.peer_failure(e)
        if not line:
            raise
        sys.exit(f"error: {line}")
    finally:
        distributed.cleanup()
    if s:       # rank 0's
        print(console.done_line(s))
        print("files: " + " ".join(s["files"]))


if __name__ == "__main__":
    main()
