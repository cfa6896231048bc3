"""What SigRL is measured and trained with that comes from earlier papers, not from SigRL itself: the metrics of
the NUS-WIDE zero-shot protocol (BiAM / MKT) and of single-positive multi-label learning (metrics), the ZSL
twin/novel groups (zsl_groups), and the SPML losses IUN, AN, EM and EM_APL (spml_losses) with EM_APL's
pseudo-negatives pass (apl)."""
