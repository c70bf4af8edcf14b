"""kars controller: reconciles KarsSandbox into pods and projects policy CRs into the router."""
